"""End-to-end check of benchmarks/efficacy_v2.py on its `--quick` profile (digits, 16 px, tiny steps):
the JSON schema, paired deltas against the stored predictions, R+ absent at fraction 1.0, no synthetic
image in val/test, finite generator metrics, and a re-run that resumes without training anything."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "efficacy_v2.py"


@pytest.fixture(scope="module")
def v2():
    spec = importlib.util.spec_from_file_location("efficacy_v2_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick(v2, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("v2")
    log: list[str] = []
    profile = v2.load_profile("v2_quick")
    v2.run_study(profile, work=tmp / "work", out_stem=tmp / "out", echo=log.append, command="test")
    return tmp, profile, json.loads((tmp / "out.json").read_text()), log


def _preds(work: Path, arm: str, f: str, r: int) -> np.ndarray:
    return np.asarray(json.loads((work / f"f{f}" / f"seed-{r}" / arm / "result.json").read_text())["test_preds"])


def test_schema_and_outputs(quick):
    tmp, profile, res, _ = quick
    if (SCRIPT.parents[1] / ".git").exists():  # a checkout: the commit the run was made at is on record
        assert res["commit"] and len(res["commit"]) == 40 and isinstance(res["commit_dirty"], bool)
    assert res["fractions"] == [0.25, 1.0] and res["repetitions"] == 2
    assert "scipy.stats.t" in res["ci_method"]
    assert (tmp / "out.md").read_text().startswith("# Efficacy v2")
    assert (tmp / "out.png").read_bytes()[:4] == b"\x89PNG"
    assert set(res["arms"]) == {"A", "B", "D", "R+", "E"}
    for arm, by_f in res["arms"].items():
        for entry in by_f.values():
            assert len(entry["test_macro_f1"]) == len(entry["scarcest_recall"]) == 2, arm
    for c in res["comparisons"]:
        assert {"arm", "vs", "fraction", "delta", "ci"} <= set(c) and len(c["ci"]) == 2
        assert c["ci"][0] <= c["delta"] <= c["ci"][1]
    assert {("B", "A"), ("E", "A"), ("E", "B"), ("D", "A"), ("R+", "A"), ("E", "D"), ("E", "R+")} <= {
        (c["arm"], c["vs"]) for c in res["comparisons"]}
    for by_f in res["worth_real_images"].values():
        for x, lo, hi in by_f.values():
            assert x is None or x >= 0
            assert lo is None or hi is None or lo <= hi
    assert set(res["worth_real_images"]["D"]) == {"0.25"}  # at 1.0 there is no larger real count to compare with


def test_paired_deltas_are_differences_of_the_stored_predictions(quick):
    tmp, _, res, _ = quick
    y, k = np.asarray(res["test_labels"]), len(res["classes"])

    def f1(arm: str, f: str, r: int) -> float:
        return f1_score(y, _preds(tmp / "work", arm, f, r), average="macro", labels=range(k), zero_division=0)

    assert res["comparisons"]
    for c in res["comparisons"]:
        diffs = [f1(c["arm"], c["fraction"], r) - f1(c["vs"], c["fraction"], r) for r in c["repetitions"]]
        assert c["repetitions"] == [0, 1]
        assert c["per_repetition"] == pytest.approx(diffs)
        assert c["delta"] == pytest.approx(np.mean(diffs))
        half = 12.7062047 * np.std(diffs, ddof=1) / np.sqrt(2)  # t(0.975, df=1)
        assert c["ci"] == pytest.approx([np.mean(diffs) - half, np.mean(diffs) + half])


def test_r_plus_is_absent_at_full_fraction_and_draws_outside_the_fraction(quick):
    tmp, _, res, _ = quick
    assert set(res["arms"]["R+"]) == {"0.25"}
    assert {"arm": "R+", "fraction": "1.0", "reason": "no train images outside the fraction"} in res["absent"]
    assert not list((tmp / "work").glob("f1.0/seed-*/R+"))
    for r in (0, 1):
        kept = set((tmp / "work" / "f0.25" / f"seed-{r}" / "train_ids.txt").read_text().split())
        rec = json.loads((tmp / "work" / "f0.25" / f"seed-{r}" / "R+" / "result.json").read_text())
        assert rec["n_extra"] == len(rec["extra_ids"]) > 0
        assert not kept & set(rec["extra_ids"])


def test_no_synthetic_image_in_val_or_test(quick, v2):
    from vision_si.data.real import load_real_data
    from vision_si.generators.runner import read_manifest

    tmp, profile, res, _ = quick
    assert res["synthetic_in_eval_splits"] == 0
    real = load_real_data(v2.v1.run_config(profile), progress=False)
    eval_ids = set(real.ids("val")) | set(real.ids("test"))
    eval_sha = set(real.sha256("val")) | set(real.sha256("test"))
    rows = [row for m in (tmp / "work").rglob("manifest.jsonl") for row in read_manifest(m)]
    assert rows  # the generators made images (CAS, D, E)
    assert not {r.id for r in rows} & eval_ids and not {r.sha256 for r in rows} & eval_sha
    # the loop ran on the subsample, with the full data's val and test
    import csv

    with open(tmp / "work" / "f0.25" / "seed-1" / "E" / "run" / "splits.csv", newline="") as fh:
        split = {row["id"]: row["split"] for row in csv.DictReader(fh)}
    assert {i for i, s in split.items() if s != "train"} == eval_ids
    kept = set((tmp / "work" / "f0.25" / "seed-1" / "train_ids.txt").read_text().split())
    assert {i for i, s in split.items() if s == "train"} == kept


def test_generator_metrics_are_finite_and_generators_trained_once(quick):
    tmp, _, res, log = quick
    assert set(res["generator"]) == {"0.25", "1.0"}
    for g in res["generator"].values():
        for key in ("cas_val_macro_f1", "kid", "memorisation_rate", "precision", "recall"):
            assert math.isfinite(g[key]), key
        assert 0 <= g["memorisation_rate"] <= 1 and 0 <= g["cas_val_macro_f1"] <= 1
    assert sum("training its generator" in m for m in log) == 2  # one per fraction, shared by repetitions


def test_rerun_resumes_without_training_and_refuses_other_settings(quick, v2):
    from vision_si.errors import ConfigError

    tmp, profile, res, _ = quick
    log: list[str] = []
    again = v2.run_study(profile, work=tmp / "work", out_stem=tmp / "out2", echo=log.append, command="test")
    assert not any("start" in m or "training" in m for m in log)
    assert again["arms"] == res["arms"] and again["comparisons"] == res["comparisons"]
    assert again["generator"] == res["generator"]
    with pytest.raises(ConfigError, match="other profile settings"):
        v2.run_study({**profile, "repetitions": 3}, work=tmp / "work", out_stem=tmp / "out3", echo=log.append)


def test_loop_round0_is_arm_a_model(quick):
    """E differs from A only by what the loop adds: its round 0 has A's weights bit for bit."""
    tmp, _, _, _ = quick
    for f in ("0.25", "1.0"):
        for r in (0, 1):
            cell = tmp / "work" / f"f{f}" / f"seed-{r}"
            a = (cell / "A" / "model" / "model.safetensors").read_bytes()
            assert (cell / "E" / "run" / "round-00" / "train" / "seed-0" / "model.safetensors").read_bytes() == a


def test_bad_profile_values_are_refused(v2, tmp_path):
    from vision_si.errors import ConfigError

    path = tmp_path / "p.yaml"
    path.write_text("fractions: [0.5, 1.5]\nrun: {data: {source: digits}}\n")
    with pytest.raises(ConfigError, match="fractions"):
        v2.load_profile(str(path))
    path.write_text("arms: [A, Z]\nrun: {data: {source: digits}}\n")
    with pytest.raises(ConfigError, match="unknown arm 'Z'"):
        v2.load_profile(str(path))
    assert v2.main(["--quick", "--arms", "A", "Z", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "w").exists()  # refused before any work


def test_worth_and_interval_helpers(v2):
    # a real-image curve rising 0.10 per 100 images; the synthetic arm sits halfway to the first real step
    pts = [(np.zeros(3), np.array([0.50, 0.52, 0.48])), (np.full(3, 100.0), np.array([0.60, 0.62, 0.58]))]
    x, lo, hi = v2.worth_real_images(pts, np.array([0.55, 0.57, 0.53]), n_bootstrap=200)
    assert x == pytest.approx(50.0) and lo <= x <= hi
    assert v2.worth_real_images(pts, np.array([0.9, 0.9, 0.9]), n_bootstrap=50)[0] is None  # beyond the curve
    assert v2.invert_curve(np.array([0.0, 10.0]), np.array([0.5, 0.4]), 0.45) == 0.0
    delta, ci = v2.t_interval([0.1, 0.3])
    assert delta == pytest.approx(0.2) and ci[0] < 0.2 < ci[1]
    rng = np.random.default_rng(0)
    same = rng.normal(size=(200, 8))
    assert abs(v2.kid(same[:100], same[100:], subsets=5, subset_size=100, seed=0)[0]) < 0.05
    assert v2.kid(same, same + 3.0, subsets=5, subset_size=100, seed=0)[0] > 0.5
    train = rng.normal(size=(50, 8))
    copies = train[:10] + 1e-4
    assert v2.memorisation_rate(copies, train, 1 / 3) == 1.0
    assert v2.memorisation_rate(rng.normal(size=(20, 8)), train, 1 / 3) < 0.5
