"""The generation runner: files, manifest, regeneration, resume and plan files (tiny preset, 16 px)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re

import numpy as np
import pytest
from PIL import Image

from vision_si.config import GenerateConfig
from vision_si.data.arrays import LabelledImages
from vision_si.errors import ConfigError, DataError
from vision_si.generators import GenerationRequest
from vision_si.generators.plan import generate_from_plan, load_plan
from vision_si.generators.runner import (
    fit_generator,
    generate_jobs,
    read_manifest,
    regenerate,
    run_generation,
    verify_folder,
)

CLASSES = ["dark", "bright"]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    labels = (np.arange(20) % 2).astype(np.int64)
    images = np.clip(np.where(labels == 1, 0.8, 0.2)[:, None, None, None]
                     + 0.1 * rng.standard_normal((20, 1, 16, 16)), 0, 1).astype(np.float32)
    ids = [f"real:{k:03d}" for k in range(20)]
    return images, labels, ids


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gen-cache")


def requests() -> list[GenerationRequest]:
    return [GenerationRequest(0, "dark", "dark/s0", 3, mode="class"),
            GenerationRequest(1, "bright", "bright/s1", 4, exemplar_ids=["real:001", "real:003"], strength=0.6)]


def train_set(data) -> LabelledImages:
    images, labels, ids = data
    return LabelledImages(images, labels, ids, [f"sha-{i}" for i in ids])


def run(data, cache, out, **kw):
    cfg = GenerateConfig(preset="tiny", cache_dir=str(cache), batch_size=kw.pop("batch_size", 3))
    return run_generation(cfg, kw.pop("reqs", None) or requests(), train=train_set(data), classes=CLASSES,
                          out_dir=out, seed=7, id_prefix="syn-r01", progress=False, **kw)


def test_run_writes_images_and_one_manifest_row_each(data, cache, tmp_path):
    res = run(data, cache, tmp_path)
    assert [r.id for r in res.rows] == [f"syn-r01-{k:06d}" for k in range(7)]
    assert [r.class_index for r in res.rows] == [0, 0, 0, 1, 1, 1, 1]
    assert [r.exemplar_ids for r in res.rows[3:]] == [["real:001"], ["real:003"], ["real:001"], ["real:003"]]
    assert [r.batch_id for r in res.rows] == ["syn-r01-000000"] * 3 + ["syn-r01-000003"] * 3 + ["syn-r01-000006"]
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [r.id for r in res.rows]
    for row in res.rows:
        path = tmp_path / row.path
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row.sha256
        with Image.open(path) as im:
            assert im.mode == "L" and im.size == (16, 16)
        assert row.generator_sha256 == res.generator_sha256 and row.preset == "tiny" and row.steps == 2
    assert res.rows[0].strength is None and res.rows[3].strength == 0.6
    assert res.n_generated == 7 and res.n_reused == 0


def test_manifest_rows_regenerate_their_images(data, cache, tmp_path):
    res = run(data, cache, tmp_path)
    images, labels, ids = data
    gen, _ = fit_generator(GenerateConfig(preset="tiny", cache_dir=str(cache)), train_set(data), CLASSES, seed=7,
                           progress=False)
    assert gen.cache_hit_
    exemplars = {i: images[ids.index(i)] for i in ("real:001", "real:003")}
    rows = read_manifest(res.manifest_path)
    for row in rows:
        again = regenerate(row, gen, rows=rows, exemplars=exemplars)
        with Image.open(tmp_path / row.path) as im:
            on_disk = np.asarray(im, dtype=np.float32)[None] / 255
        np.testing.assert_array_equal(again, on_disk)
    with pytest.raises(DataError, match="needs exemplar"):
        regenerate(rows[3], gen, rows=rows)
    assert verify_folder(tmp_path, gen, exemplars=exemplars) == {"no_row": [], "bad_file": [], "differs": []}
    (tmp_path / "images" / "stray.png").write_bytes((tmp_path / rows[0].path).read_bytes())
    (tmp_path / rows[2].path).write_bytes((tmp_path / rows[1].path).read_bytes())
    assert verify_folder(tmp_path, gen, exemplars=exemplars) == {"no_row": ["stray"], "bad_file": [rows[2].id],
                                                                 "differs": []}


def test_resume_skips_finished_ids_and_repairs_missing_or_corrupt_files(data, cache, tmp_path):
    first = run(data, cache, tmp_path)
    original = {r.id: (tmp_path / r.path).read_bytes() for r in first.rows}
    (tmp_path / first.rows[1].path).unlink()  # lost
    (tmp_path / first.rows[4].path).write_bytes(b"not a png")  # corrupt
    manifest = tmp_path / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # killed while appending the last row
    before = {r.id: (tmp_path / r.path).stat().st_mtime_ns for r in first.rows if (tmp_path / r.path).exists()}
    second = run(data, cache, tmp_path)
    assert second.n_reused == 4 and second.n_generated == 3
    ids = [json.loads(line)["id"] for line in manifest.read_text().splitlines()]
    assert ids == [r.id for r in first.rows]  # every id once, in order
    for r in second.rows:
        assert (tmp_path / r.path).read_bytes() == original[r.id]  # repaired to the very same bytes
    untouched = [first.rows[0].id]  # valid: its chunk was recomputed for row 1, but its file was left alone
    assert all((tmp_path / f"images/{i}.png").stat().st_mtime_ns == before[i] for i in untouched)
    third = run(data, cache, tmp_path)
    assert third.n_generated == 0 and third.n_reused == 7


def test_a_generate_fn_computes_only_the_pending_chunks_and_is_closed_when_the_job_stops(data, cache, tmp_path):
    first = run(data, cache, tmp_path)
    original = {r.id: (tmp_path / r.path).read_bytes() for r in first.rows}
    (tmp_path / first.rows[4].path).unlink()
    asked, closed = [], []

    def elsewhere(generator, preset, jobs, **kwargs):  # stands in for another engine (Ray)
        asked.extend(j.id for j in jobs)
        try:
            yield from generate_jobs(generator, jobs, **kwargs)
        finally:
            closed.append(True)

    again = run(data, cache, tmp_path, generate_fn=elsewhere)
    assert asked == [r.id for r in first.rows if r.batch_id == first.rows[4].batch_id]  # the lost image's chunk
    assert (again.n_generated, again.n_reused) == (1, 6) and closed == [True]
    assert all((tmp_path / r.path).read_bytes() == original[r.id] for r in again.rows)

    def broken(generator, preset, jobs, **kwargs):
        try:
            for job, image, seconds in generate_jobs(generator, jobs, **kwargs):
                yield job, image[:, :, None], seconds  # not a C×H×W image: writing it fails
        finally:
            closed.append(True)

    (tmp_path / first.rows[4].path).unlink()
    with pytest.raises(ValueError, match="C×H×W") as failure:
        run(data, cache, tmp_path, generate_fn=broken)
    assert closed == [True, True] and failure.traceback  # closed by the runner, not when the traceback goes


def test_runs_with_other_seeds_but_one_train_seed_share_one_trained_generator(data, tmp_path):
    cache = tmp_path / "cache"

    def go(seed: int, train_seed: int | None, out: str):
        cfg = GenerateConfig(preset="tiny", cache_dir=str(cache), batch_size=4, train_seed=train_seed)
        return run_generation(cfg, requests(), train=train_set(data), classes=CLASSES, out_dir=tmp_path / out,
                              seed=seed, progress=False)

    first, second = go(0, 5, "a"), go(1, 5, "b")
    assert not first.cache_hit and second.cache_hit
    assert second.generator_sha256 == first.generator_sha256
    assert len(list(cache.glob("*/meta.json"))) == 1
    assert {r.seed for r in first.rows}.isdisjoint(r.seed for r in second.rows)  # images follow the run seed
    # no train_seed is the run's seed, as before it existed: run seed 5 finds the entry trained with seed 5,
    # and run seed 1 trains its own
    assert go(5, None, "c").cache_hit
    assert not go(1, None, "d").cache_hit and len(list(cache.glob("*/meta.json"))) == 2


def test_changed_parameters_are_regenerated_not_reused(data, cache, tmp_path):
    run(data, cache, tmp_path)
    reqs = requests()
    reqs[1].strength = 0.3
    res = run(data, cache, tmp_path, reqs=reqs)
    assert res.n_reused == 3 and res.n_generated == 4
    assert all(r.strength == 0.3 for r in res.rows[3:])


def test_bad_requests_fail_before_any_training(data, cache, tmp_path):
    bad = [GenerationRequest(1, "bright", "s", 2, exemplar_ids=["real:999"])]
    with pytest.raises(DataError, match=r"real:999.*training split"):
        run(data, cache, tmp_path, reqs=bad)
    with pytest.raises(ConfigError, match="guided.*classifier"):
        run(data, cache, tmp_path, reqs=[GenerationRequest(0, "dark", "s", 2, mode="guided")])


def test_guided_requests_use_the_classifier(data, cache, tmp_path):
    import torch

    def toy(x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([-m, m], dim=1)

    res = run(data, cache, tmp_path, reqs=[GenerationRequest(1, "bright", "s", 2, mode="guided")], classifier_fn=toy)
    assert [r.mode for r in res.rows] == ["guided", "guided"] and res.rows[0].classifier_scale == 1.0


def test_plan_file_runs_as_a_resumable_batch_job(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""
seed: 3
data: {{source: digits, image_size: 16, cache_dir: ''}}
generate: {{preset: tiny, cache_dir: {tmp_path / 'cache'}, batch_size: 4}}
id_prefix: syn-plan
requests:
  - {{class: "3", count: 3, mode: class}}
  - {{class: 7, count: 2, mode: class, slice_id: sevens}}
""")
    res = generate_from_plan(plan, tmp_path / "out", progress=False)
    assert [r.class_name for r in res.rows] == ["3", "3", "3", "7", "7"]
    assert res.rows[3].slice == "sevens" and all((tmp_path / "out" / r.path).is_file() for r in res.rows)
    again = generate_from_plan(plan, tmp_path / "out", progress=False)
    assert again.n_generated == 0 and again.cache_hit


def test_plan_errors_name_the_request_and_key(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("requests:\n  - {class: a, count: 2, colour: red}\n")
    with pytest.raises(ConfigError, match=r"requests\[0\] has unknown key\(s\) \['colour'\]"):
        load_plan(plan)
    plan.write_text("generate: {preset: tiny, batchsize: 3}\nrequests:\n  - {class: a, count: 2}\n")
    with pytest.raises(ConfigError, match="batchsize"):
        load_plan(plan)
    plan.write_text("requests:\n  - {class: a, count: 2, mode: exemplar}\n")
    with pytest.raises(ConfigError, match=r"requests\[0\].*no exemplar_ids"):
        load_plan(plan)


@pytest.mark.skipif(importlib.util.find_spec("elpv_dataset") is None, reason="elpv extra not installed")
def test_the_documented_elpv_plan_names_real_classes_and_training_ids(tmp_path):
    import vision_si.generators.plan as plan_module
    from vision_si.data import load_source, make_splits

    example = re.search(r"```yaml\n(.*?)```", plan_module.__doc__, re.S).group(1)
    (tmp_path / "plan.yaml").write_text(example)
    plan = load_plan(tmp_path / "plan.yaml")
    table = load_source(plan.config.data, plan.config.seed, progress=False)
    splits = make_splits(table, plan.config.data.split, plan.config.seed)
    train_ids = {i for i, s in zip(table.ids, splits, strict=True) if s == "train"}
    exemplar_requests = [r for r in plan.requests if r.mode == "exemplar"]
    assert exemplar_requests
    for req in plan.requests:
        assert req.class_name in table.classes or 0 <= req.class_index < len(table.classes)
    for req in exemplar_requests:
        assert req.exemplar_ids and set(req.exemplar_ids) <= train_ids
        # an exemplar is an image of the class it asks for
        assert {table.labels[table.ids.index(i)] for i in req.exemplar_ids} == {table.classes.index(req.class_name)}


def test_a_plan_job_trains_its_generator_on_the_runs_train_split_only(tmp_path, monkeypatch):
    """With `data.split.seed` set, a plan job (naming the run, or giving the run's seed and data) trains its
    generator on exactly the run's train ids, as `splits.csv` lists them; the split the run seed alone makes
    (what the plan job used to make) holds other images, val and test ones among them."""
    import yaml
    from tiny_run import make_run

    import vision_si.generators.runner as runner
    from vision_si.data import load_source, make_splits
    from vision_si.data.splits import read_splits_csv

    run = make_run(tmp_path, until="train", name="plansplit", data={"split": {"seed": 7}})
    run_train = [r["id"] for r in read_splits_csv(run / "splits.csv") if r["split"] == "train"]
    seen: list[list[str]] = []
    real_fit = runner.fit_generator

    def spy(cfg, train, classes, **kwargs):
        seen.append(list(train.ids))
        return real_fit(cfg, train, classes, **kwargs)

    monkeypatch.setattr(runner, "fit_generator", spy)
    run_cfg = yaml.safe_load((run / "config.yaml").read_text())
    generate = {"preset": "tiny", "batch_size": 4, "cache_dir": str(tmp_path / "gen-cache")}
    request = [{"class": "3", "count": 2, "mode": "class"}]
    plans = {"names_the_run": {"run": str(run), "generate": generate, "requests": request},
             "seed_and_data": {"seed": run_cfg["seed"], "data": run_cfg["data"], "generate": generate,
                               "requests": request}}
    for name, content in plans.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(content))
        res = generate_from_plan(tmp_path / f"{name}.yaml", tmp_path / name, progress=False)
        assert len(res.rows) == 2
    assert seen == [run_train, run_train]
    cfg = load_plan(tmp_path / "seed_and_data.yaml").config
    table = load_source(cfg.data, cfg.seed, progress=False)
    by_run_seed = make_splits(table, cfg.data.split, cfg.seed)
    assert {i for i, s in zip(table.ids, by_run_seed, strict=True) if s == "train"} != set(run_train)


def test_a_plan_naming_a_run_refuses_its_own_seed_or_data(tmp_path):
    from tiny_run import make_run

    run = make_run(tmp_path, until="train", name="planclash")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"run: {run}\nseed: 5\nrequests: [{{class: 1, count: 1, mode: class}}]\n")
    with pytest.raises(ConfigError, match="seed"):
        load_plan(plan)
    plan.write_text(f"run: {tmp_path}\nrequests: [{{class: 1, count: 1, mode: class}}]\n")
    with pytest.raises(ConfigError, match="not a run directory"):
        load_plan(plan)
