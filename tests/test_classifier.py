"""The classifier: learning, bitwise determinism, resume after a crash, checkpoints without pickle, prediction."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import pickle

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from vision_si import classifier as clf_mod
from vision_si.classifier import create_classifier, load_classifier, predict, train_classifier
from vision_si.classifier import inference as inference_mod
from vision_si.config import ClassifierConfig
from vision_si.data.augment import build_augmentation
from vision_si.errors import ConfigError, DataError

TINY = {"channels": [8, 16, 32, 64]}  # resnet10t at a few thousand parameters per stage
CLASSES = ["dark", "bright", "striped"]


def _cfg(**kw) -> ClassifierConfig:
    base = dict(arch="resnet10t", model_kwargs=dict(TINY), steps=24, batch_size=16, warmup_steps=3, lr=3e-3,
                eval_every=6, device="cpu", predict_batch_size=64)
    return ClassifierConfig(**{**base, **kw})


def _toy(n: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Three classes a small CNN can learn: dark noise, bright noise, noise with horizontal stripes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = rng.random((n, 1, size, size), dtype=np.float32) * 0.4
    images[labels == 1] += 0.5
    images[labels == 2, :, ::2] += 0.6
    return np.clip(images, 0, 1).astype(np.float32), labels.astype(np.int64)


def _weights(path: pathlib.Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path / "model.safetensors"))


def _bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loss_falls_and_the_model_learns_a_toy_problem(tmp_path):
    x, y = _toy(96, seed=0)
    vx, vy = _toy(48, seed=1)
    clf = train_classifier(_cfg(steps=40), x, y, classes=CLASSES, seed=0, out_dir=tmp_path, val_images=vx,
                           val_labels=vy, progress=False)
    history = json.loads((tmp_path / "history.json").read_text())
    losses = [r["loss"] for r in history["train"]]
    assert len(losses) == 40  # the budget is optimizer steps, exactly
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    assert history["val"][-1]["step"] == 40 and len(history["val"]) == 40 // 6 + 1
    lrs = [r["lr"] for r in history["train"]]
    assert lrs[0] < lrs[2] == pytest.approx(max(lrs)) and lrs[-1] < 0.05 * max(lrs)  # warm-up, then cosine
    assert all(r["images_per_s"] > 0 for r in history["train"])
    acc = (predict(clf, vx).probs.argmax(1) == vy).mean()
    assert acc >= 0.9


def test_same_seed_gives_bitwise_identical_weights_and_another_seed_differs(tmp_path):
    x, y = _toy(60, seed=0)
    sx, sy = _toy(30, seed=5)  # stand-in synthetic images, mixed in with the bounded share
    cfg = _cfg(steps=16, ema=True, model_kwargs={**TINY, "drop_rate": 0.2}, sampling="balanced")

    def run(seed: int, name: str) -> pathlib.Path:
        train_classifier(cfg, x, y, classes=CLASSES, seed=seed, out_dir=tmp_path / name, extra_images=sx,
                         extra_labels=sy, extra_ids=[f"syn-r01-{i:06d}" for i in range(30)],
                         augment=build_augmentation("standard", channels=1, seed=seed), progress=False)
        return tmp_path / name

    a, b, c = run(0, "a"), run(0, "b"), run(1, "c")
    assert _bitwise_equal(_weights(a), _weights(b))
    assert not _bitwise_equal(_weights(a), _weights(c))
    meta_a, meta_b = (json.loads((p / "model.json").read_text()) for p in (a, b))
    assert meta_a["weights_sha256"] == meta_b["weights_sha256"]
    assert meta_a["n_synthetic"] == 30 and meta_a["ema"] is True


class _Crash(RuntimeError):
    pass


def test_resume_after_a_crash_ends_with_the_uninterrupted_weights(tmp_path):
    x, y = _toy(60, seed=0)
    vx, vy = _toy(30, seed=1)
    # everything that carries state across steps: dropout (global RNG), EMA, best-on-val, AdamW moments
    cfg = _cfg(steps=20, ema=True, ema_decay=0.9, select_best_on_val=True, eval_every=4,
               model_kwargs={**TINY, "drop_rate": 0.3})
    kwargs = dict(classes=CLASSES, seed=3, val_images=vx, val_labels=vy, progress=False, checkpoint_every=5)

    def aug():
        return build_augmentation("standard", channels=1, seed=3)

    whole = train_classifier(cfg, x, y, out_dir=tmp_path / "whole", augment=aug(), **kwargs)

    def crash_at_12(step, record):
        if step == 12:
            raise _Crash

    with pytest.raises(_Crash):
        train_classifier(cfg, x, y, out_dir=tmp_path / "crashed", augment=aug(), callback=crash_at_12, **kwargs)
    resume_file = tmp_path / "crashed" / "resume.safetensors"
    assert resume_file.is_file() and not (tmp_path / "crashed" / "model.json").exists()
    with safetensors.safe_open(str(resume_file), framework="pt") as fh:
        assert json.loads(fh.metadata()["vision_si_resume"])["step"] == 10  # steps 11-12 are redone

    steps_seen = []
    resumed = train_classifier(cfg, x, y, out_dir=tmp_path / "crashed", augment=aug(),
                               callback=lambda s, r: steps_seen.append(s), **kwargs)
    assert steps_seen == list(range(11, 21))
    assert _bitwise_equal(_weights(tmp_path / "whole"), _weights(tmp_path / "crashed"))
    assert resumed.checkpoint_sha256 == whole.checkpoint_sha256
    assert not resume_file.exists()
    history = json.loads((tmp_path / "crashed" / "history.json").read_text())
    assert [r["step"] for r in history["train"]] == list(range(1, 21))
    assert history == {**json.loads((tmp_path / "whole" / "history.json").read_text()),
                       "train": history["train"]}  # val history and selection equal too

    # a finished folder is loaded, not trained again; other arguments train afresh
    again = train_classifier(cfg, x, y, out_dir=tmp_path / "crashed", augment=aug(),
                             callback=crash_at_12, **kwargs)
    assert again.checkpoint_sha256 == whole.checkpoint_sha256
    with pytest.raises(_Crash):
        train_classifier(dataclasses.replace(cfg, lr=1e-3), x, y, out_dir=tmp_path / "crashed", augment=aug(),
                         callback=crash_at_12, **kwargs)


def _evil_pickle(marker: pathlib.Path) -> bytes:
    class Evil:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    return pickle.dumps(Evil())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch notes the protocol, then refuses
def test_checkpoint_round_trip_and_refusals_without_unpickling(tmp_path):
    x, y = _toy(30, seed=0)
    out = tmp_path / "model"
    clf = train_classifier(_cfg(steps=4), x, y, classes=CLASSES, seed=0, out_dir=out, progress=False)
    loaded = load_classifier(out, device="cpu", arch="resnet10t", classes=CLASSES)
    assert loaded.checkpoint_sha256 == clf.checkpoint_sha256
    np.testing.assert_array_equal(predict(loaded, x).logits, predict(clf, x).logits)
    assert load_classifier(out / "model.json").checkpoint_sha256 == clf.checkpoint_sha256

    with pytest.raises(DataError, match=r"model\.json.*classes"):
        load_classifier(out, classes=["a", "b", "c"])
    with pytest.raises(DataError, match=r"model\.json.*'resnet18'"):
        load_classifier(out, arch="resnet18")

    marker = tmp_path / "pwned"
    evil = _evil_pickle(marker)
    pickle.loads(evil)  # the payload works when unpickled ...
    assert marker.exists()
    marker.unlink()

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(evil)
    meta = json.loads((out / "model.json").read_text())
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"bad/model\.safetensors.*sha256"):
        load_classifier(bad)
    import hashlib

    meta["weights_sha256"] = hashlib.sha256(evil).hexdigest()  # even with a matching hash
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"bad/model\.safetensors.*not a safetensors file"):
        load_classifier(bad)
    (bad / "model.pt").write_bytes(evil)
    with pytest.raises(DataError, match=r"model\.pt.*never loaded"):
        load_classifier(bad / "model.pt")
    # a pickled pretrained file goes through timm's torch.load(weights_only=True), which refuses it
    with pytest.raises(ConfigError, match=r"classifier\.pretrained.*model\.pt"):
        create_classifier(_cfg(pretrained=str(bad / "model.pt")), 3, 1, 16)
    assert not marker.exists()

    with pytest.raises(DataError, match="not found"):
        load_classifier(tmp_path / "nowhere")


def test_predict_embeddings_probabilities_and_cache(tmp_path, monkeypatch):
    x, y = _toy(30, seed=0)
    clf = train_classifier(_cfg(steps=4), x, y, classes=CLASSES, seed=0, out_dir=tmp_path / "m", progress=False)
    p = predict(clf, x, batch_size=7)
    assert p.embeddings.shape == (30, clf.model.num_features)
    assert p.logits.shape == p.probs.shape == (30, 3)
    np.testing.assert_allclose(p.probs.sum(1), 1, atol=1e-5)
    with torch.no_grad():
        direct = clf.logits(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(p.logits, direct, atol=1e-4)

    cache = tmp_path / "cache"
    first = predict(clf, x[:20], cache_dir=cache)
    np.testing.assert_allclose(first.embeddings, p.embeddings[:20], atol=1e-5)
    calls = []
    real_forward = inference_mod._forward

    def counting_forward(model, images, *args, **kw):
        calls.append(len(images))
        return real_forward(model, images, *args, **kw)

    monkeypatch.setattr(inference_mod, "_forward", counting_forward)
    again = predict(clf, x, cache_dir=cache)  # 20 cached, 10 new
    assert calls == [10]
    np.testing.assert_array_equal(again.logits[:20], first.logits)
    np.testing.assert_allclose(again.logits, p.logits, atol=1e-5)
    predict(clf, x[::-1], cache_dir=cache)  # all cached, in any order
    assert calls == [10]
    other = predict(clf, x[:3] * 0.5, cache_dir=cache)  # other pixels, other keys
    assert calls == [10, 3] and not np.allclose(other.logits, p.logits[:3])
    with pytest.raises(DataError, match="expected"):
        predict(clf, np.zeros((2, 3, 16, 16), np.float32))


def test_local_pretrained_file_through_timm_overlay(tmp_path):
    source = timm.create_model("resnet10t", num_classes=3, in_chans=3, **TINY)
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    theirs = source.state_dict()

    rgb = create_classifier(_cfg(pretrained=str(path)), num_classes=3, in_chans=3, image_size=16).state_dict()
    body = [k for k in theirs if not k.startswith("fc.")]
    assert all(torch.equal(rgb[k], theirs[k]) for k in body)
    scratch = create_classifier(_cfg(), num_classes=3, in_chans=3, image_size=16).state_dict()
    assert not torch.equal(scratch["conv1.0.weight"], theirs["conv1.0.weight"])
    # grayscale: timm folds the RGB filters of the first conv into one channel
    gray = create_classifier(_cfg(pretrained=str(path)), num_classes=3, in_chans=1, image_size=16).state_dict()
    torch.testing.assert_close(gray["conv1.0.weight"], theirs["conv1.0.weight"].sum(1, keepdim=True))
    assert torch.equal(gray["layer1.0.conv1.weight"], theirs["layer1.0.conv1.weight"])


def test_preprocessing_comes_from_timm_and_bad_input_is_named(tmp_path):
    model = create_classifier(_cfg(), 3, 1, 16)
    mean, std = clf_mod.normalisation(model, 1)
    expected = timm.data.resolve_model_data_config(model)
    assert mean == [pytest.approx(np.mean(expected["mean"]))] and std == [pytest.approx(np.mean(expected["std"]))]
    assert clf_mod.normalisation(model, 3) == (list(expected["mean"]), list(expected["std"]))

    x, y = _toy(12, seed=0)
    with pytest.raises(ConfigError, match="resnet10"):
        create_classifier(_cfg(arch="resnet10q"), 3, 1, 16)
    with pytest.raises(ConfigError, match="classifier.pretrained.*not found"):
        create_classifier(_cfg(pretrained=str(tmp_path / "missing.safetensors")), 3, 1, 16)
    with pytest.raises(DataError, match="class indices 0..2"):
        train_classifier(_cfg(), x, y + 1, classes=CLASSES, seed=0, out_dir=tmp_path / "a", progress=False)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        train_classifier(_cfg(), x * 255, y, classes=CLASSES, seed=0, out_dir=tmp_path / "b", progress=False)
    with pytest.raises(DataError, match="extra images"):
        train_classifier(_cfg(), x, y, classes=CLASSES, seed=0, out_dir=tmp_path / "c", extra_images=x[:, :, :8],
                         extra_labels=y, progress=False)


# --------------------------------------------------------------------------- the recipe's pieces


def test_budget_in_epochs_counts_real_images_only(tmp_path):
    from vision_si.classifier.training import train_steps, warmup_steps

    cfg = _cfg(epochs=2.0, batch_size=16, warmup_steps=None)
    assert train_steps(cfg, 100) == 13 and train_steps(_cfg(steps=24), 100) == 24
    assert warmup_steps(cfg, 100) == 5 and warmup_steps(_cfg(warmup_steps=3), 100) == 3
    x, y = _toy(40, seed=0)
    sx, sy = _toy(200, seed=1)  # many synthetic images: the budget stays that of the 40 real ones
    clf = train_classifier(cfg, x, y, classes=CLASSES, seed=0, out_dir=tmp_path, extra_images=sx, extra_labels=sy,
                           progress=False)
    assert clf.meta["steps"] == train_steps(cfg, 40) == 5
    assert len(json.loads((tmp_path / "history.json").read_text())["train"]) == 5


def test_logit_adjustment_raises_the_scarce_class_on_raw_logits(tmp_path):
    rng = np.random.default_rng(0)
    x, y = _toy(150, seed=0)
    keep = np.r_[np.flatnonzero(y != 2), rng.choice(np.flatnonzero(y == 2), 6, replace=False)]  # class 2 scarce
    x, y = x[keep], y[keep]
    # ambiguous test images: half 'dark', half 'striped' features blended
    a, _ = _toy(60, seed=3)
    base = dict(sampling="natural", steps=40, label_smoothing=0.0)
    plain = train_classifier(_cfg(**base), x, y, classes=CLASSES, seed=0, out_dir=tmp_path / "ce", progress=False)
    adjusted = train_classifier(_cfg(**base, loss="logit_adjusted"), x, y, classes=CLASSES, seed=0,
                                out_dir=tmp_path / "la", progress=False)
    assert adjusted.meta["loss"] == "logit_adjusted"
    prior = np.asarray(adjusted.meta["draw_prior"])
    assert prior[2] < 0.1 and prior.sum() == pytest.approx(1.0)
    p_plain, p_adj = predict(plain, a).probs[:, 2].mean(), predict(adjusted, a).probs[:, 2].mean()
    assert p_adj > p_plain  # raw logits of the adjusted model give the scarce class its balanced share


def test_batchnorm_is_recalibrated_on_clean_training_images(tmp_path):
    x, y = _toy(64, seed=0)
    aug = build_augmentation("strong", channels=1, seed=0)
    on = train_classifier(_cfg(steps=12), x, y, classes=CLASSES, seed=0, out_dir=tmp_path / "on", augment=aug,
                          progress=False)
    off = train_classifier(_cfg(steps=12, bn_recalibrate=False), x, y, classes=CLASSES, seed=0,
                           out_dir=tmp_path / "off", augment=aug, progress=False)
    a, b = _weights(tmp_path / "on"), _weights(tmp_path / "off")
    bn = [k for k in a if k.endswith("running_mean")]
    conv = [k for k in a if k.endswith("conv1.weight") or k.endswith("conv.weight")]
    assert bn and all(torch.equal(a[k], b[k]) for k in conv)  # same weights...
    assert not all(torch.equal(a[k], b[k]) for k in bn)  # ...other statistics
    # the recalibrated statistics are the exact mean of the first BN layer's inputs over the training images
    first = bn[0].rsplit(".", 1)[0]
    module = dict(on.model.named_modules())[first]
    captured = []
    hook = module.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
    on.model.train()
    mean, std = inference_mod._norm_tensors(on.meta, on.device)
    with torch.no_grad():
        on.model((torch.from_numpy(x) - mean) / std)
    hook.remove()
    np.testing.assert_allclose(module.running_mean.numpy(), captured[0].mean(dim=(0, 2, 3)).numpy(), atol=1e-5)
    assert on.meta["bn_recalibrated"] and not off.meta["bn_recalibrated"]


def test_flip_tta_makes_predictions_invariant_to_flips(tmp_path):
    x, y = _toy(48, seed=0)
    clf = train_classifier(_cfg(steps=8, tta=True), x, y, classes=CLASSES, seed=0, out_dir=tmp_path / "tta",
                           progress=False)
    plain = train_classifier(_cfg(steps=8), x, y, classes=CLASSES, seed=0, out_dir=tmp_path / "plain",
                             progress=False)
    v, _ = _toy(10, seed=4)
    flipped = np.ascontiguousarray(v[..., ::-1])
    p, q = predict(clf, v), predict(clf, flipped)
    np.testing.assert_allclose(p.probs, q.probs, atol=1e-5)
    np.testing.assert_allclose(p.embeddings, q.embeddings, atol=1e-5)
    assert not np.allclose(predict(plain, v).probs, predict(plain, flipped).probs, atol=1e-5)


def test_warm_start_begins_from_the_given_weights_and_is_checked(tmp_path):
    x, y = _toy(48, seed=0)
    start = train_classifier(_cfg(steps=10), x, y, classes=CLASSES, seed=0, out_dir=tmp_path / "start",
                             progress=False)
    seen = {}

    def first_step(step, record):
        if step == 1:
            seen["lr"] = record["lr"]

    warm = train_classifier(_cfg(steps=1, warmup_steps=0, lr=1e-9, bn_recalibrate=False), x, y, classes=CLASSES,
                            seed=5, out_dir=tmp_path / "warm", init_from=start, progress=False, callback=first_step)
    a, b = _weights(tmp_path / "start"), _weights(tmp_path / "warm")
    conv = [k for k in a if k.endswith("weight") and a[k].ndim == 4]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in conv)  # a tiny step from the start weights
    assert warm.meta["init_from"]["sha256"] == start.checkpoint_sha256
    with pytest.raises(DataError, match="init_from"):
        train_classifier(_cfg(steps=1), x, y, classes=["p", "q", "r"], seed=0, out_dir=tmp_path / "bad",
                         init_from=start, progress=False)
