"""The pretrain stage: a self-supervised encoder (lightly) on tiny data, its cache, resume, the never-val/test
rule, the classifier starting from it, the loop stage and `vsi pretrain`."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml

pytest.importorskip("lightly")

from cli_helpers import run_vsi, vsi  # noqa: E402
from conftest import write_image  # noqa: E402
from tiny_run import tiny_config  # noqa: E402

from vision_si import pretrain as pt  # noqa: E402
from vision_si.classifier import create_classifier  # noqa: E402
from vision_si.classifier.model import encoder_file_metadata  # noqa: E402
from vision_si.config import ClassifierConfig, PretrainConfig, config_from_dict  # noqa: E402
from vision_si.errors import ConfigError, DataError  # noqa: E402

ARCH, KW = "resnet10t", {"channels": [8, 16, 32, 64]}


def toy_images(n: int = 16, channels: int = 1, size: int = 16, seed: int = 0) -> np.ndarray:
    """Images with structure (a bright square at a random place on a noisy background)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 0.3, (n, channels, size, size)).astype(np.float32)
    for i in range(n):
        r, c, w = rng.integers(0, size - 6), rng.integers(0, size - 6), rng.integers(3, 7)
        x[i, :, r:r + w, c:c + w] = rng.uniform(0.6, 1.0)
    return x


def ids_sha(n: int) -> tuple[list[str], list[str]]:
    return [f"img{i:03d}" for i in range(n)], [f"{i:064x}" for i in range(n)]


def small_cfg(tmp_path: Path, **over) -> PretrainConfig:
    base = {"enabled": True, "epochs": 2.0, "batch_size": 8, "lr": 3e-3, "checkpoint_every": 2,
            "cache_dir": str(tmp_path / "encoders")}
    return PretrainConfig(**{**base, **over})


def train(cfg: PretrainConfig, x: np.ndarray, **kw) -> pt.Encoder:
    ids, sha = ids_sha(len(x))
    return pt.pretrain_encoder(cfg, x, ids, sha, arch=ARCH, model_kwargs=KW, seed=kw.pop("seed", 0), progress=False, **kw)


def weights(enc: pt.Encoder) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(enc.weights_file))


def same_weights(a: pt.Encoder, b: pt.Encoder) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------------- views and training


@pytest.mark.parametrize("channels", [1, 3])
def test_views_differ_between_draws_and_repeat_for_a_seed(channels):
    x = toy_images(4, channels)
    views = pt.view_augmentation(PretrainConfig(flips=True), 16)
    from vision_si.data.loader import _apply_augment

    a, b = _apply_augment(views, x[0], 11), _apply_augment(views, x[0], 12)
    assert a.shape == x[0].shape and a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    assert not np.allclose(a, b)  # two views of one image differ
    assert np.array_equal(a, _apply_augment(views, x[0], 11))  # and each is fixed by its seed
    rows, seeds = pt.batch_rows(0, 3, 10, 4)
    rows2, seeds2 = pt.batch_rows(0, 3, 10, 4)
    assert np.array_equal(rows, rows2) and np.array_equal(seeds, seeds2)
    assert (seeds[:, 0] != seeds[:, 1]).all()


def test_every_image_is_seen_once_per_epoch():
    rows = np.concatenate([pt.batch_rows(5, s, 10, 4)[0] for s in range(5)])  # 20 draws = 2 epochs of 10
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))


def test_loss_decreases_and_training_is_deterministic_for_a_seed(tmp_path):
    x = toy_images(16)
    cfg = small_cfg(tmp_path, epochs=40.0, batch_size=16, checkpoint_every=1000)
    enc = train(cfg, x)
    losses = enc.meta["losses"]
    assert len(losses) == 40 and enc.trained_steps == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.25, losses  # chance level is ln(31) = 3.43
    again = train(dataclasses.replace(cfg, cache_dir=str(tmp_path / "other")), x)
    assert not again.cache_hit and same_weights(enc, again)
    other_seed = train(dataclasses.replace(cfg, cache_dir=str(tmp_path / "seed1")), x, seed=1)
    assert not same_weights(enc, other_seed)
    meta = json.loads((enc.path / "encoder.json").read_text())
    for key in ("arch", "in_chans", "image_size", "mean", "std", "cache_key", "n_inputs", "method", "seconds"):
        assert key in meta
    assert meta["in_chans"] == 1 and meta["n_inputs"] == 16 and meta["cache_key"] == enc.path.name


@pytest.mark.parametrize("method", ["simclr", "vicreg"])
def test_each_method_trains_an_rgb_encoder_whose_embeddings_are_unit_vectors(tmp_path, method):
    x = toy_images(12, channels=3)
    enc = train(small_cfg(tmp_path, method=method, epochs=1.0), x)
    emb = enc.embed(x, batch_size=5)
    assert emb.shape == (12, 64) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(emb, pt.load_encoder(enc.path).embed(x))  # eval mode: deterministic
    assert enc.meta["method"] == method
    with pytest.raises(DataError, match="channel"):
        enc.embed(toy_images(2, channels=1))


def test_order_of_the_inputs_does_not_change_the_encoder(tmp_path):
    x = toy_images(10)
    ids, sha = ids_sha(10)
    cfg = small_cfg(tmp_path, epochs=1.0)
    a = pt.pretrain_encoder(cfg, x, ids, sha, arch=ARCH, model_kwargs=KW, seed=0, progress=False)
    perm = np.random.default_rng(0).permutation(10)
    b = pt.pretrain_encoder(cfg, x[perm], [ids[i] for i in perm], [sha[i] for i in perm], arch=ARCH,
                            model_kwargs=KW, seed=0, progress=False)
    assert b.cache_hit and b.path == a.path


# ---------------------------------------------------------------------- cache and resume


def test_second_call_with_the_same_inputs_loads_the_cache_without_training(tmp_path, monkeypatch):
    x = toy_images(10)
    cfg = small_cfg(tmp_path, epochs=1.0)
    first = train(cfg, x)
    mtime = first.weights_file.stat().st_mtime_ns

    def no_training(*_a, **_k):
        raise AssertionError("trained again")

    monkeypatch.setattr(pt, "_train", no_training)
    second = train(cfg, x)
    assert second.cache_hit and second.trained_steps == 0 and second.path == first.path
    assert second.weights_file.stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="trained again"):  # other settings: another key, so training
        train(dataclasses.replace(cfg, temperature=0.5), x)
    with pytest.raises(AssertionError, match="trained again"):  # other pixels under the same ids/sha256 too
        train(cfg, np.clip(x + 0.01, 0, 1))


def test_an_interrupted_pretraining_resumes_to_bit_identical_weights(tmp_path):
    x = toy_images(12)
    cfg = small_cfg(tmp_path, epochs=3.0, batch_size=6, checkpoint_every=2)  # 6 steps
    whole = train(dataclasses.replace(cfg, cache_dir=str(tmp_path / "whole")), x)

    class Killed(Exception):
        pass

    def kill_at_3(step, _loss):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, x, on_step=kill_at_3)
    partial = list((tmp_path / "encoders").glob("*.partial"))
    assert len(partial) == 1 and (partial[0] / "checkpoint.safetensors").is_file()
    assert not [p for p in (tmp_path / "encoders").iterdir() if not p.name.endswith(".partial")]
    resumed = train(cfg, x)
    assert resumed.trained_steps == 4  # from the checkpoint at step 2 to step 6
    assert same_weights(whole, resumed)
    assert resumed.meta["losses"] == whole.meta["losses"]
    assert not partial[0].exists()


# ---------------------------------------------------------------------- never val or test


def test_forbidden_ids_and_contents_are_refused_by_name(tmp_path):
    x = toy_images(6)
    ids, sha = ids_sha(6)
    cfg = small_cfg(tmp_path, epochs=1.0)
    with pytest.raises(DataError, match="'img004'.*val/test"):
        pt.pretrain_encoder(cfg, x, ids, sha, arch=ARCH, model_kwargs=KW, forbidden_ids={"img004"}, progress=False)
    with pytest.raises(DataError, match="'img002'.*same content"):
        pt.pretrain_encoder(cfg, x, ids, sha, arch=ARCH, model_kwargs=KW, forbidden_sha256={sha[2]}, progress=False)
    assert not (tmp_path / "encoders").exists()  # refused before any work


def labelled_folder(root: Path, n_per_class: int = 8) -> Path:
    seed = 0
    for cls in ("a", "b"):
        for i in range(n_per_class):
            write_image(root / cls / f"{i:02d}.png", seed, size=16)
            seed += 1
    return root


def test_a_run_never_reads_a_val_or_test_image_and_leaves_out_an_unlabelled_copy(tmp_path, monkeypatch):
    from vision_si.data import load_source, make_splits

    root = labelled_folder(tmp_path / "labelled")
    unlabelled = tmp_path / "unlabelled"
    for i in range(5):
        write_image(unlabelled / "deep" / f"u{i}.png", 1000 + i, size=16)
    cfg = config_from_dict(tiny_config(tmp_path, data={"source": "imagefolder", "root": str(root),
                                                       "unlabelled": str(unlabelled), "max_per_class": None},
                                       classifier={"model_kwargs": KW},
                                       pretrain={"enabled": True, "epochs": 1.0, "batch_size": 8,
                                                 "cache_dir": str(tmp_path / "encoders")}))
    table = load_source(cfg.data, 0, progress=False)
    splits = make_splits(table, cfg.data.split, 0)
    test_i = int(np.flatnonzero(splits == "test")[0])
    shutil.copy(table.sources[test_i], unlabelled / "copy_of_test.png")
    held_paths = {table.sources[i] for i in np.flatnonzero(splits != "train")}
    held_sha = {table.sha256[i] for i in np.flatnonzero(splits != "train")}

    decoded: list[str] = []
    import vision_si.data.files as files

    real_decode = files.decode_array
    monkeypatch.setattr(files, "decode_array", lambda data, where, *a, **k: decoded.append(str(where))
                        or real_decode(data, where, *a, **k))
    real_decode_image = files.decode_image  # the unlabelled table's loader
    monkeypatch.setattr(files, "decode_image", lambda path, *a, **k: decoded.append(str(path))
                        or real_decode_image(path, *a, **k))
    real_load = table.loader
    monkeypatch.setattr(table, "loader", lambda i: decoded.append(table.sources[i]) or real_load(i))
    messages: list[str] = []
    enc = pt.run_pretrain(cfg, table, splits, channels=1, out_dir=tmp_path, progress=False, echo=messages.append)

    assert not held_paths & set(decoded)
    assert str(unlabelled / "copy_of_test.png") not in decoded  # excluded after hashing, before decoding
    assert any("copy_of_test.png" in m and "left out" in m for m in messages)
    assert not held_sha & set(enc.meta["inputs_sha256"])
    assert enc.meta["n_inputs"] == int((splits == "train").sum()) + 5
    pointer = json.loads((tmp_path / "encoder.json").read_text())
    assert pointer["path"] == str(enc.path) and pointer["n_unlabelled"] == 5
    assert [e["id"] for e in pointer["excluded_eval_copies"]] == ["unlabelled:copy_of_test.png"]


# ---------------------------------------------------------------------- the classifier starts from it


def test_the_classifier_starts_from_the_encoders_backbone(tmp_path):
    x = toy_images(10)
    enc = train(small_cfg(tmp_path, epochs=1.0), x)
    cfg = ClassifierConfig(arch=ARCH, model_kwargs=KW, pretrained=str(enc.weights_file))
    torch.manual_seed(0)
    model = create_classifier(cfg, num_classes=3, in_chans=1, image_size=16)
    backbone = weights(enc)
    state = model.state_dict()
    assert torch.equal(state["conv1.0.weight"], backbone["conv1.0.weight"])
    assert torch.equal(state["layer4.0.bn2.running_var"], backbone["layer4.0.bn2.running_var"])
    scratch = create_classifier(dataclasses.replace(cfg, pretrained="none"), 3, 1, 16)
    assert not torch.equal(scratch.state_dict()["conv1.0.weight"], backbone["conv1.0.weight"])

    with pytest.raises(ConfigError, match="resnet10t.*resnet18"):
        create_classifier(dataclasses.replace(cfg, arch="resnet18", model_kwargs={}), 3, 1, 16)
    with pytest.raises(ConfigError, match="channel"):
        create_classifier(cfg, 3, 3, 16)
    with pytest.raises(ConfigError, match="'ssl'"):
        create_classifier(dataclasses.replace(cfg, pretrained="ssl"), 3, 1, 16)
    partial = {k: v for k, v in backbone.items() if not k.startswith("layer4.")}  # a backbone missing a block
    cut = tmp_path / "cut.safetensors"
    safetensors.torch.save_file(partial, str(cut), metadata=encoder_file_metadata(ARCH, 1))
    with pytest.raises(ConfigError, match="does not cover the backbone.*layer4"):
        create_classifier(dataclasses.replace(cfg, pretrained=str(cut)), 3, 1, 16)


def test_which_weights_the_classifier_starts_from(tmp_path):
    enc = train(small_cfg(tmp_path, epochs=0.5), toy_images(8))
    base = tiny_config(tmp_path, pretrain={"enabled": True})
    resolve = lambda **c: pt.classifier_start(config_from_dict(tiny_config(tmp_path, **c)), enc)  # noqa: E731
    assert resolve(pretrain={"enabled": True}, classifier={"pretrained": "ssl"}) == str(enc.weights_file)
    assert resolve(pretrain={"enabled": True}) == str(enc.weights_file)  # none + use_for classifier
    assert resolve(pretrain={"enabled": True, "use_for": ["diagnosis"]}) == "none"
    local = tmp_path / "mine.safetensors"
    local.write_bytes(b"")
    assert resolve(pretrain={"enabled": True}, classifier={"pretrained": str(local)}) == str(local)  # the user's first
    assert pt.classifier_start(config_from_dict(base), None) == "none"


# ---------------------------------------------------------------------- config


@pytest.mark.parametrize("section,match", [
    ({"pretrain": {"epochs": 0}}, "pretrain.epochs"),
    ({"pretrain": {"batch_size": 1}}, "pretrain.batch_size"),
    ({"pretrain": {"method": "byol"}}, "pretrain.method"),
    ({"pretrain": {"use_for": ["critic"]}}, "pretrain.use_for.*critic"),
    ({"pretrain": {"crop_min_scale": 0}}, "pretrain.crop_min_scale"),
    ({"pretrain": {"temperature": -1}}, "pretrain.temperature"),
    ({"pretrain": {"image_size": 4}}, "pretrain.image_size"),
    ({"pretrain": {"epoch": 3}}, "did you mean 'epochs'"),
    ({"data": {"unlabelled": "extra/"}}, "data.unlabelled.*pretrain.enabled"),
    ({"classifier": {"pretrained": "ssl"}}, "pretrain.enabled: true"),
    ({"classifier": {"pretrained": "ssl"}, "pretrain": {"enabled": True, "use_for": ["filter"]}}, "use_for"),
])
def test_config_errors_name_the_key(tmp_path, section, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(tiny_config(tmp_path, **section))


def test_pretrain_section_round_trips(tmp_path):
    from vision_si.config import config_to_dict

    cfg = config_from_dict(tiny_config(tmp_path, pretrain={"enabled": True, "method": "vicreg", "image_size": 32},
                                       data={"unlabelled": "extra/"}))
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert PretrainConfig().use_for == ["classifier", "diagnosis", "filter"] and not PretrainConfig().enabled


# ---------------------------------------------------------------------- the loop and the command line


def pretrain_run_config(tmp_path: Path, **over) -> Path:
    cfg = tiny_config(tmp_path, classifier={"model_kwargs": KW, "steps": 2, "eval_every": 2},
                      pretrain={"enabled": True, "epochs": 0.5, "batch_size": 16,
                                "cache_dir": str(tmp_path / "encoders")}, **over)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_loop_pretrains_first_and_round_0_starts_from_the_encoder(tmp_path, capsys):
    from vision_si.config import load_config
    from vision_si.loop import run_loop

    cfg = load_config(pretrain_run_config(tmp_path, loop={"max_rounds": 0}))
    run_dir = run_loop(cfg, progress=False, echo=lambda _m: None, until="train")
    pointer = json.loads((run_dir / "pretrain" / "encoder.json").read_text())
    weights_file = str(Path(pointer["path"]) / "model.safetensors")
    meta = json.loads((run_dir / "round-00" / "train" / "seed-0" / "model.json").read_text())
    assert meta["pretrained"] == weights_file
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    stages = [e["stage"] for e in events if e["event"] == "stage_done"]
    assert stages[:2] == ["pretrain", "round-00/train"]

    # `vsi pretrain RUN_DIR` on a complete stage only reads it; the run goes no further
    code, _err = vsi(capsys, "pretrain", run_dir)
    assert code == 0
    assert not (run_dir / "round-00" / "diagnose").exists()

    # the loop keeps the encoder and gives label-free embeddings of the run's images by split
    from vision_si.loop import Loop
    from vision_si.pretrain import label_free_embeddings

    loop = Loop(cfg, run_dir, progress=False, echo=lambda _m: None)
    st = loop.prepare()
    assert loop.encoder is None and st.encoder is None  # no encoder before the stage has been read
    assert loop.pretrain_stage(st)
    assert loop.cfg.classifier.pretrained == weights_file == st.cfg.classifier.pretrained
    assert st.encoder is loop.encoder
    emb = label_free_embeddings(loop.encoder, {s: st.data.pixels(s) for s in ("train", "val")})
    assert set(emb) == {"train", "val"} and emb["val"].shape == (len(st.data.pixels("val")), 64)
    np.testing.assert_allclose(np.linalg.norm(emb["val"], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(emb["train"], loop.encoder.embed(st.data.pixels("train")))

    # a cache entry deleted after the run: the stage is redone on resume, to the same key and weights
    shutil.rmtree(pointer["path"])
    code, _err = vsi(capsys, "pretrain", run_dir)
    assert code == 0 and (Path(pointer["path"]) / "model.safetensors").is_file()
    again = json.loads((run_dir / "pretrain" / "encoder.json").read_text())
    assert again["cache_key"] == pointer["cache_key"] and again["weights_sha256"] == pointer["weights_sha256"]


def test_vsi_pretrain_trains_then_loads_and_refuses_bad_input(tmp_path, capsys, monkeypatch):


    config = pretrain_run_config(tmp_path)
    code, err, out = run_vsi(capsys, "pretrain", config, "--quiet")
    assert code == 0, err
    assert "encoder: " in out and str(tmp_path / "encoders") in out
    (run_dir,) = list((tmp_path / "runs").iterdir())
    assert (run_dir / "pretrain" / "encoder.json").is_file() and not (run_dir / "round-00").exists()
    code, err, out2 = run_vsi(capsys, "pretrain", config, "--quiet")  # a new run, same inputs: the cache
    assert code == 0 and out2.splitlines()[0] == out.splitlines()[0]

    code, err, _ = run_vsi(capsys, "pretrain", config, "--set", "pretrain.epochs=-1")
    assert code == 2 and "pretrain.epochs" in err and "Traceback" not in err
    code, err, _ = run_vsi(capsys, "pretrain", tmp_path / "missing.yaml")
    assert code == 2 and "missing.yaml" in err
    monkeypatch.setitem(sys.modules, "lightly", None)  # as if the extra were not installed
    before = set((tmp_path / "runs").iterdir())
    for command in ("pretrain", "run"):  # `vsi run` with pretrain.enabled too
        code, err, _ = run_vsi(capsys, command, config)
        assert code == 2 and "pip install lightly" in err and "[pretrain]" in err
        assert set((tmp_path / "runs").iterdir()) == before  # refused before any work: no run directory left
