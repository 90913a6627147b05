"""The gate: accepts a confident gain, refuses no gain, a loss, or a collapsing class."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from vision_si.classifier import predict, train_classifier
from vision_si.config import ClassifierConfig, GateConfig
from vision_si.errors import ConfigError, DataError, InputError
from vision_si.gate import GateDecision, decide, run_gate
from vision_si.metrics import bootstrap_interval, paired_bootstrap

CLASSES = ["a", "b", "c", "d"]
K = len(CLASSES)


@pytest.fixture
def val():
    """400 val images, 100 per class; a baseline right on about 70 % of them."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(K), 100)
    wrong = rng.uniform(size=labels.size) < 0.3
    base = np.where(wrong, (labels + rng.integers(1, K, labels.size)) % K, labels)
    return labels, base, rng


def fix_errors(labels, preds, rows):
    out = preds.copy()
    out[rows] = labels[rows]
    return out


def test_a_candidate_better_on_a_chunk_of_val_is_accepted(val):
    labels, base, _ = val
    errors = np.flatnonzero(base != labels)
    cand = fix_errors(labels, base, errors[: len(errors) // 2])  # half the errors fixed, nothing broken
    d = decide(GateConfig(), val_labels=labels, baseline_preds=base, candidate_preds=cand, classes=CLASSES)
    assert d.accepted and d.reason_code == "gain" and d.decision == "accepted"
    assert d.delta["ci"][0] > 0 and d.after["value"] > d.before["value"]
    assert d.delta["value"] == pytest.approx(d.after["value"] - d.before["value"])
    assert all(v["delta"] >= 0 for v in d.per_class.values())


def test_a_worse_candidate_is_refused(val):
    labels, base, rng = val
    right = np.flatnonzero(base == labels)
    cand = base.copy()
    broken = right[: len(right) // 5]
    cand[broken] = (labels[broken] + 1) % K
    d = decide(GateConfig(), val_labels=labels, baseline_preds=base, candidate_preds=cand, classes=CLASSES)
    assert not d.accepted and d.reason_code == "no_confident_gain" and d.delta["ci"][1] < 0
    assert "lower bound" in d.reason


def test_identical_predictions_are_refused_because_the_lower_bound_is_not_above_zero(val):
    labels, base, _ = val
    d = decide(GateConfig(), val_labels=labels, baseline_preds=base, candidate_preds=base.copy(), classes=CLASSES)
    assert not d.accepted and d.delta["ci"] == [0.0, 0.0] and d.reason_code == "no_confident_gain"


def test_a_collapsing_class_is_refused_even_with_an_overall_gain(val):
    labels, base, _ = val
    cand = fix_errors(labels, base, np.flatnonzero((base != labels) & (labels != 3)))  # classes a-c perfect
    d_ok = decide(GateConfig(), val_labels=labels, baseline_preds=base, candidate_preds=cand, classes=CLASSES)
    assert d_ok.accepted
    right_d = np.flatnonzero((cand == labels) & (labels == 3))
    cand[right_d[:20]] = 0  # class d loses 20 of its 100 hits: recall −0.20
    d = decide(GateConfig(tolerance=0.05), val_labels=labels, baseline_preds=base, candidate_preds=cand,
               classes=CLASSES)
    assert d.delta["ci"][0] > 0, "the overall gain is still confident"
    assert not d.accepted and d.reason_code == "class_regression" and d.regressions == ["d"]
    assert d.per_class["d"]["delta"] == pytest.approx(-0.20)
    assert "tolerance" in d.reason
    loose = decide(GateConfig(tolerance=0.25), val_labels=labels, baseline_preds=base, candidate_preds=cand,
                   classes=CLASSES)
    assert loose.accepted


def scarce_val():
    """Class d has only 16 val images, the others 100: one d image is a recall step of 0.0625."""
    labels = np.concatenate([np.repeat(np.arange(3), 100), np.full(16, 3)])
    base = labels.copy()
    base[np.flatnonzero(labels == 3)[:6]] = 0  # d: 10 of 16 right
    base[np.flatnonzero(labels == 0)[:40]] = 1  # room for a gain on a, b, c
    base[np.flatnonzero(labels == 1)[:40]] = 2
    return labels, base


@pytest.mark.parametrize(("lost", "regressed"), [(1, False), (2, True)])
def test_a_scarce_class_may_lose_one_val_image_but_not_two(lost, regressed):
    labels, base = scarce_val()
    cand = fix_errors(labels, base, np.flatnonzero((base != labels) & (labels != 3)))  # a, b, c perfect
    d_right = np.flatnonzero((base == labels) & (labels == 3))
    cand[d_right[:lost]] = 0  # d loses `lost` of its 10 hits: recall -0.0625 per image
    d = decide(GateConfig(tolerance=0.05), val_labels=labels, baseline_preds=base, candidate_preds=cand,
               classes=CLASSES)
    assert d.delta["ci"][0] > 0, "the overall gain is confident"
    assert d.per_class["d"]["delta"] == pytest.approx(-lost / 16)
    assert d.per_class["d"]["allowed"] == pytest.approx(1 / 16)
    assert d.per_class["a"]["allowed"] == pytest.approx(0.05), "100 images: the plain tolerance is finer"
    assert (d.regressions == ["d"]) is regressed and d.accepted is not regressed
    if regressed:
        assert "1 val image(s) of the class" in d.reason and "allowed -0.0625" in d.reason
    # the floor off (tolerance_min_images 0): the plain tolerance calls even one flipped image a regression
    plain = decide(GateConfig(tolerance=0.05, tolerance_min_images=0), val_labels=labels, baseline_preds=base,
                   candidate_preds=cand, classes=CLASSES)
    assert plain.regressions == ["d"] and not plain.accepted


def test_several_seeds_decide_on_the_paired_mean(val):
    labels, base, _ = val
    errors = np.flatnonzero(base != labels)
    better = fix_errors(labels, base, errors[:40])
    base3 = np.stack([base, base, base])
    one_seed_better = np.stack([better, base, base])
    d = decide(GateConfig(seeds=3, bootstrap="images"), val_labels=labels, baseline_preds=base3,
               candidate_preds=one_seed_better, classes=CLASSES, model_seeds=[7, 8, 9])
    single = decide(GateConfig(), val_labels=labels, baseline_preds=base, candidate_preds=better, classes=CLASSES)
    assert d.delta["value"] == pytest.approx(single.delta["value"] / 3)
    assert d.seeds == [7, 8, 9]
    assert d.delta["ci"][1] - d.delta["ci"][0] < single.delta["ci"][1] - single.delta["ci"][0]
    with pytest.raises(DataError, match="same seeds"):
        decide(GateConfig(), val_labels=labels, baseline_preds=base3, candidate_preds=better, classes=CLASSES)


def test_weak_class_recall_metric(val):
    labels, base, _ = val
    cand = fix_errors(labels, base, np.flatnonzero((base != labels) & (labels == 2)))
    cfg = GateConfig(metric="weak_class_recall")
    with pytest.raises(InputError, match="weak"):
        decide(cfg, val_labels=labels, baseline_preds=base, candidate_preds=cand, classes=CLASSES)
    d = decide(cfg, val_labels=labels, baseline_preds=base, candidate_preds=cand, classes=CLASSES, weak_classes=[2])
    assert d.accepted and d.after["value"] == pytest.approx(1.0)
    assert d.before["value"] == pytest.approx(np.mean(base[labels == 2] == 2))


def test_gate_off_accepts_but_records_what_it_would_have_decided(val, tmp_path):
    labels, base, _ = val
    d = decide(GateConfig(enabled=False), val_labels=labels, baseline_preds=base, candidate_preds=base.copy(),
               classes=CLASSES)
    assert d.accepted and not d.gate_enabled and d.would_accept is False and d.reason_code == "gate_off"
    assert "gate off" in d.reason
    d.save(tmp_path)
    back = GateDecision.load(tmp_path)
    assert back == d
    assert back.summary()["decision"] == "accepted" and back.summary()["gate_enabled"] is False


def test_decision_round_trips_and_names_its_settings(val, tmp_path):
    labels, base, _ = val
    cfg = dataclasses.replace(GateConfig(), n_bootstrap=500, confidence=0.9)
    d = decide(cfg, val_labels=labels, baseline_preds=base, candidate_preds=base.copy(), classes=CLASSES, seed=3)
    d.save(tmp_path)
    back = GateDecision.load(tmp_path)
    assert back == d
    assert back.bootstrap["n_bootstrap"] == 500 and back.bootstrap["confidence"] == 0.9 and back.bootstrap["seed"] == 3
    assert set(back.per_class) == set(CLASSES) and back.n_val == labels.size


def test_bad_predictions_are_named(val):
    labels, base, _ = val
    with pytest.raises(DataError, match="candidate_preds"):
        decide(GateConfig(), val_labels=labels, baseline_preds=base, candidate_preds=base[:-1], classes=CLASSES)
    with pytest.raises(DataError, match="integer"):
        decide(GateConfig(), val_labels=labels, baseline_preds=base, candidate_preds=base.astype(float),
               classes=CLASSES)
    with pytest.raises(DataError, match="0..3"):
        decide(GateConfig(), val_labels=labels, baseline_preds=base, candidate_preds=base + 1, classes=CLASSES)


# --------------------------------------------------------------------------- run_gate: real training


@pytest.fixture(scope="module")
def digits():
    """Digits 8×8: 8 training images a class (a weak baseline), 40 held out a class, 30 val a class."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    per_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(10)]
    tr, held, val = (np.concatenate([i[a:b] for i in per_class]) for a, b in ((0, 8), (8, 48), (48, 78)))
    return {"x": x, "y": y, "tr": tr, "held": held, "val": val, "classes": [str(c) for c in range(10)]}


CLF = ClassifierConfig(arch="resnet10t", model_kwargs={"channels": [16, 32, 64, 128]}, steps=60, batch_size=32,
                       lr=3e-3, warmup_steps=5, label_smoothing=0.0, device="cpu", eval_every=1000)


def baseline(digits, tmp_path, seeds):
    x, y = digits["x"], digits["y"]
    preds = []
    for k, s in enumerate(seeds):
        clf = train_classifier(CLF, x[digits["tr"]], y[digits["tr"]], classes=digits["classes"], seed=s,
                               out_dir=tmp_path / f"baseline-{k}", progress=False)
        preds.append(predict(clf, x[digits["val"]]).probs.argmax(1))
    return np.stack(preds)


def gate_with(digits, tmp_path, name, cand_labels, cfg, base, **kw):
    x, y, held = digits["x"], digits["y"], digits["held"]
    return run_gate(cfg, CLF, train_images=x[digits["tr"]], train_labels=y[digits["tr"]], pool_images=None,
                    pool_labels=None, pool_ids=None, candidate_images=x[held], candidate_labels=cand_labels,
                    candidate_ids=[f"held-{i}" for i in held], val_images=x[digits["val"]],
                    val_labels=y[digits["val"]], classes=digits["classes"], seed=0, out_dir=tmp_path / name,
                    baseline_preds=base, progress=False, **kw)


def test_run_gate_accepts_a_pool_that_helps_and_refuses_one_that_harms(digits, tmp_path):
    base = baseline(digits, tmp_path, [0])
    right = digits["y"][digits["held"]]
    helped = gate_with(digits, tmp_path, "helpful", right, GateConfig(), base)
    assert helped.accepted and helped.reason_code == "gain" and helped.delta["ci"][0] > 0
    assert (tmp_path / "helpful" / "decision.json").is_file()
    assert (tmp_path / "helpful" / "candidate-0" / "model.json").is_file()
    assert helped.training["n_candidates"] == len(right) and helped.seeds == [0]
    harmed = gate_with(digits, tmp_path, "harmful", (right + 1) % 10, GateConfig(), base)  # every label wrong
    assert not harmed.accepted and harmed.delta["ci"][1] < 0 and harmed.regressions


def test_run_gate_trains_one_model_per_seed_with_the_baseline_seeds(digits, tmp_path):
    from vision_si.data import build_augmentation

    cfg = GateConfig(seeds=2)
    base = baseline(digits, tmp_path, [0, 1])
    right = digits["y"][digits["held"]]
    with pytest.raises(DataError, match="same seeds"):
        gate_with(digits, tmp_path, "one-side", right, cfg, base[:1])
    d = gate_with(digits, tmp_path, "two", right, cfg, base,
                  augment=lambda seed: build_augmentation("light", 1, seed))
    assert d.seeds == [0, 1] and d.training["models"] == ["candidate-0", "candidate-1"]
    assert d.accepted
    weights = tmp_path / "two" / "candidate-1" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = gate_with(digits, tmp_path, "two", right, cfg, base,
                      augment=lambda seed: build_augmentation("light", 1, seed))
    assert again.delta == d.delta and weights.stat().st_mtime_ns == stamp  # loaded, not retrained
    empty = run_gate(cfg, CLF, train_images=digits["x"][digits["tr"]], train_labels=digits["y"][digits["tr"]],
                     pool_images=None, pool_labels=None, pool_ids=None,
                     candidate_images=np.zeros((0, 1, 8, 8), np.float32), candidate_labels=np.zeros(0, np.int64),
                     candidate_ids=[], val_images=digits["x"][digits["val"]], val_labels=digits["y"][digits["val"]],
                     classes=digits["classes"], seed=0, out_dir=tmp_path / "empty", baseline_preds=base,
                     progress=False)
    assert not empty.accepted and empty.decision == "skipped" and not (tmp_path / "empty" / "candidate-0").exists()


# --------------------------------------------------------------------------- training noise: seeds resampled


def seeds_with_gains(labels, base, fixed_per_seed):
    """Candidates of three seeds against one baseline: seed s fixes (n > 0) or breaks (n < 0) n images."""
    errors, right = np.flatnonzero(base != labels), np.flatnonzero(base == labels)
    rows = []
    for n in fixed_per_seed:
        if n >= 0:
            rows.append(fix_errors(labels, base, errors[:n]))
        else:
            broken = base.copy()
            broken[right[:-n]] = (labels[right[:-n]] + 1) % K
            rows.append(broken)
    return np.stack([base] * len(rows)), np.stack(rows)


def test_resampling_seeds_widens_the_interval_when_seeds_disagree(val):
    labels, base, _ = val
    base3, cand3 = seeds_with_gains(labels, base, [60, 0, 30])
    images = paired_bootstrap(labels, base3, cand3, K, "macro_f1", seed=4)
    both = paired_bootstrap(labels, base3, cand3, K, "macro_f1", seed=4, resample_seeds=True)
    assert both["delta"] == images["delta"]
    assert both["upper"] - both["lower"] > 1.5 * (images["upper"] - images["lower"])
    assert both["lower"] < images["lower"]
    assert len(both["per_seed_delta"]) == 3 and both["per_seed_delta"][1] == 0.0
    assert both["seed_sd"] == pytest.approx(np.std(both["per_seed_delta"], ddof=1))
    lo_i, hi_i = bootstrap_interval(labels, cand3, K, "macro_f1", seed=4)
    lo_b, hi_b = bootstrap_interval(labels, cand3, K, "macro_f1", seed=4, resample_seeds=True)
    assert hi_b - lo_b > hi_i - lo_i


def test_resampling_seeds_changes_nothing_when_all_seeds_agree(val):
    labels, base, _ = val
    cand = fix_errors(labels, base, np.flatnonzero(base != labels)[:25])
    base3, cand3 = np.stack([base] * 3), np.stack([cand] * 3)
    images = paired_bootstrap(labels, base3, cand3, K, "macro_f1", seed=2)
    both = paired_bootstrap(labels, base3, cand3, K, "macro_f1", seed=2, resample_seeds=True)
    assert (both["lower"], both["upper"], both["p_not_better"]) == (images["lower"], images["upper"],
                                                                     images["p_not_better"])
    assert both["seed_sd"] == 0.0
    one = paired_bootstrap(labels, base, cand, K, "macro_f1", seed=2, resample_seeds=True)
    assert (one["lower"], one["upper"]) == (images["lower"], images["upper"]) and one["seed_sd"] is None
    assert bootstrap_interval(labels, cand3, K, "macro_f1", seed=2, resample_seeds=True) == \
        bootstrap_interval(labels, cand3, K, "macro_f1", seed=2)
    d = decide(GateConfig(seeds=3), val_labels=labels, baseline_preds=base3, candidate_preds=cand3, classes=CLASSES)
    d_img = decide(GateConfig(seeds=3, bootstrap="images"), val_labels=labels, baseline_preds=base3,
                   candidate_preds=cand3, classes=CLASSES)
    assert d.accepted and d_img.accepted and d.delta["ci"] == d_img.delta["ci"]


def test_seeds_that_straddle_zero_are_refused_though_the_image_bootstrap_would_accept(val):
    labels, base, _ = val
    base3, cand3 = seeds_with_gains(labels, base, [80, 70, -40])  # two seeds gain a lot, one loses
    kw = dict(val_labels=labels, baseline_preds=base3, candidate_preds=cand3, classes=CLASSES)
    loose = dict(tolerance=1.0)  # judge the metric alone, not the per-class check
    pooled = decide(GateConfig(seeds=3, bootstrap="images", **loose), **kw)
    assert pooled.accepted and pooled.delta["ci"][0] > 0, "the image-only bootstrap sees a confident gain"
    d = decide(GateConfig(seeds=3, **loose), **kw)
    assert min(d.delta["per_seed"]) < 0 < max(d.delta["per_seed"])
    assert not d.accepted and d.reason_code == "no_confident_gain" and d.delta["ci"][0] <= 0
    assert "per seed" in d.reason and "seeds_and_images" in GateConfig().bootstrap
    assert "seed pairs" in d.bootstrap["method"]


def test_auto_noise_floor_asks_the_lower_bound_to_clear_the_between_seed_spread(val, tmp_path):
    labels, base, _ = val
    base3, cand3 = seeds_with_gains(labels, base, [100, 20, 60])  # every seed gains, by very different amounts
    kw = dict(val_labels=labels, baseline_preds=base3, candidate_preds=cand3, classes=CLASSES)
    plain = decide(GateConfig(seeds=3, tolerance=1.0), **kw)
    assert plain.accepted and plain.noise_floor == 0.0 and "noise" not in plain.reason
    floor = decide(GateConfig(seeds=3, tolerance=1.0, noise_floor="auto"), **kw)
    assert floor.noise_floor == pytest.approx(np.std(floor.delta["per_seed"], ddof=1))
    assert floor.delta["ci"] == plain.delta["ci"]
    assert floor.accepted == (floor.delta["ci"][0] > floor.noise_floor)
    assert not floor.accepted and "noise floor" in floor.reason
    fixed = decide(GateConfig(seeds=3, tolerance=1.0, noise_floor=0.5), **kw)
    assert not fixed.accepted and fixed.noise_floor == 0.5
    one = decide(GateConfig(noise_floor="auto"), val_labels=labels, baseline_preds=base, candidate_preds=cand3[0],
                 classes=CLASSES)
    assert one.accepted and one.noise_floor == 0.0 and "no estimate" in one.reason
    floor.save(tmp_path)
    assert GateDecision.load(tmp_path) == floor


def test_gate_config_checks_the_new_keys():
    from vision_si.config import config_from_dict

    cfg = config_from_dict({"gate": {"seeds": 3, "noise_floor": "auto", "bootstrap": "images"}})
    assert cfg.gate.noise_floor == "auto" and cfg.gate.bootstrap == "images"
    assert config_from_dict({"gate": {"noise_floor": 0.02}}).gate.noise_floor == 0.02
    for bad in ("sometimes", -0.1, 2, True, [0.1]):
        with pytest.raises(ConfigError, match="gate.noise_floor"):
            config_from_dict({"gate": {"noise_floor": bad}})
    with pytest.raises(ConfigError, match="gate.bootstrap"):
        config_from_dict({"gate": {"bootstrap": "seeds"}})
