"""The gate: paired seeds, calibration, probability metric, two questions, a sequential design fixed in advance."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from vision_si.classifier import train_classifier
from vision_si.config import ClassifierConfig, GateConfig, config_from_dict
from vision_si.data.arrays import LabelledImages
from vision_si.errors import ConfigError, DataError
from vision_si.gate import GateDecision, SidePredictions, decide, fit_calibration, run_gate, sequential_levels
from vision_si.gate.statistics import metric_batch, paired_interval

CLASSES = ["a", "b", "c", "d"]
K = len(CLASSES)


def logp(p):
    return np.log(np.clip(p, 1e-9, 1))


def model_outputs(labels, quality, rng, noise=1.0):
    """Log-probs of a model whose true-class logit is raised by `quality` above Gaussian noise."""
    z = rng.normal(0, noise, (labels.size, K))
    z[np.arange(labels.size), labels] += quality
    return z - np.logaddexp.reduce(z, axis=1, keepdims=True)


def sides(labels_sel, labels_judge, base_quality, cand_quality, n_seeds, seed=0, shift=None, seed_noise=0.0):
    """Paired seeds: seed s of both sides shares its noise (common random numbers), as paired trainings do."""
    rng = np.random.default_rng(seed)
    out = {"baseline": ([], []), "candidate": ([], [])}
    for _s in range(n_seeds):
        jitter = rng.normal(0, seed_noise)
        for part, labels in ((0, labels_sel), (1, labels_judge)):
            state = rng.bit_generator.state
            base = model_outputs(labels, base_quality, np.random.default_rng(rng.integers(1 << 30)))
            rng.bit_generator.state = state
            cand = model_outputs(labels, cand_quality + jitter, np.random.default_rng(rng.integers(1 << 30)))
            if shift is not None:  # a moved decision boundary: one class's logit raised everywhere
                cand = cand + shift
                cand = cand - np.logaddexp.reduce(cand, axis=1, keepdims=True)
            out["baseline"][part].append(base)
            out["candidate"][part].append(cand)
    return {k: SidePredictions(np.stack(v[0]), np.stack(v[1])) for k, v in out.items()}


@pytest.fixture
def labels():
    sel = np.repeat(np.arange(K), [100, 30, 12, 60])
    judge = np.repeat(np.arange(K), [100, 30, 12, 60])
    return sel, judge


def run(cfg, labels, s, n_seeds):
    sel, judge = labels
    return decide(cfg, classes=CLASSES, select_labels=sel, judge_labels=judge, baseline=s["baseline"],
                  candidate=s["candidate"], seeds=list(range(n_seeds)))


ONE_LOOK = dict(seeds_per_look=3, max_seeds=3)


# --------------------------------------------------------------------------- statistics


def test_sequential_levels_spend_alpha_like_obrien_fleming():
    levels = sequential_levels((3, 6, 9), 0.025)
    # Lan-DeMets O'Brien-Fleming, 3 equally spaced looks, one-sided 0.025: about 0.0001, 0.006, 0.023
    assert levels[0] == pytest.approx(0.0001, abs=0.00005)
    assert levels[1] == pytest.approx(0.006, abs=0.0006)
    assert levels[2] == pytest.approx(0.023, abs=0.0015)
    assert levels[0] < levels[1] < levels[2] < 0.025 and sum(levels) > 0.025  # correlated looks
    assert sequential_levels((5,), 0.025) == (0.025,)
    with pytest.raises(ValueError, match="increasing"):
        sequential_levels((3, 3), 0.025)


def test_sequential_design_keeps_the_false_acceptance_rate_at_alpha_under_no_effect():
    """Simulated null: per-seed improvements N(0, 1); the design accepts in about 2.5 % of trials, not more."""
    rng = np.random.default_rng(1)
    schedule, alpha = (3, 6, 9), 0.025
    levels = sequential_levels(schedule, alpha)
    accepted = 0
    trials = 4000
    for _ in range(trials):
        d = rng.normal(0, 1, 9)
        for n, lv in zip(schedule, levels, strict=True):
            x = d[:n]
            lower = x.mean() - stats.t.ppf(1 - lv, n - 1) * x.std(ddof=1) / np.sqrt(n)
            if lower > 0:
                accepted += 1
                break
    assert accepted / trials <= alpha + 0.01


def test_auroc_by_ranks_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, K, 300)
    p = rng.dirichlet(np.ones(K), 300).round(2)  # rounding makes ties
    lp = logp(p / p.sum(1, keepdims=True))
    ours = metric_batch("macro_auroc", y, lp, np.full(K, 1 / K), np.arange(300)[None])[0]
    assert ours == pytest.approx(roc_auc_score(y, np.exp(lp), multi_class="ovr", average="macro"), abs=1e-12)


def test_calibration_recovers_a_temperature_and_a_class_bias():
    rng = np.random.default_rng(0)
    n = 4000
    true = rng.normal(0, 1.5, (n, K))
    y = np.array([rng.choice(K, p=np.exp(r - np.logaddexp.reduce(r))) for r in true])
    bias = np.array([0.8, -0.3, -0.4, -0.1])
    model = (true - bias) * 2.0  # over-confident and with a shifted prior
    cal = fit_calibration(model - np.logaddexp.reduce(model, axis=1, keepdims=True), y)
    assert cal.temperature == pytest.approx(2.0, rel=0.1)
    np.testing.assert_allclose(cal.bias - cal.bias.mean(), bias - bias.mean(), atol=0.15)


def test_paired_interval_is_the_t_interval_with_the_image_variance_added(labels):
    sel, judge = labels
    s = sides(sel, judge, 1.0, 1.3, 5, seed_noise=0.2)
    prior = np.bincount(sel) / sel.size
    iv = paired_interval("macro_auroc", judge, s["baseline"].judge, s["candidate"].judge, prior,
                         one_sided_alpha=0.025, n_bootstrap=500)
    assert iv.seed_sd == pytest.approx(np.std(iv.per_seed, ddof=1))
    a, b = iv.seed_sd ** 2 / 5, iv.image_se ** 2
    assert iv.df == pytest.approx((a + b) ** 2 / (a ** 2 / 4 + b ** 2 / 499))  # Welch-Satterthwaite
    assert iv.df >= 4
    half = stats.t.ppf(0.975, iv.df) * np.sqrt(a + b)
    assert iv.upper - iv.delta == pytest.approx(half) and iv.delta - iv.lower == pytest.approx(half)
    assert iv.delta == pytest.approx(np.mean(iv.per_seed)) and "t-interval over 5 paired seeds" in iv.method
    one = paired_interval("macro_auroc", judge, s["baseline"].judge[:1], s["candidate"].judge[:1], prior,
                          one_sided_alpha=0.025, n_bootstrap=500)
    assert one.seed_sd is None and "training noise not estimated" in one.method


# --------------------------------------------------------------------------- decisions with a known answer


def test_exact_copies_do_no_harm_but_do_not_help(labels):
    """Identical sides: non-inferior, not superior. Superiority refuses them, non-inferiority admits them."""
    s = sides(*labels, 1.0, 1.0, 3)
    assert np.array_equal(s["baseline"].judge, s["candidate"].judge)
    sup = run(GateConfig(**ONE_LOOK), labels, s, 3)
    assert not sup.accepted and sup.non_inferiority and not sup.superiority and not sup.harm
    assert sup.delta.value == 0 and sup.reason_code == "no_confident_gain"
    ni = run(GateConfig(admit="non_inferiority", **ONE_LOOK), labels, s, 3)
    assert ni.accepted and ni.reason_code == "no_harm" and ni.non_inferiority and not ni.superiority


def test_a_clear_harm_or_a_clear_gain_stops_the_gate_at_the_first_look(labels):
    harmed = run(GateConfig(), labels, sides(*labels, 2.5, 0.5, 3), 3)
    assert not harmed.accepted and harmed.harm and harmed.reason_code == "harm"
    assert harmed.stopped_early and harmed.looks[-1].outcome == "reject" and harmed.delta.ci[1] < 0
    helped = run(GateConfig(), labels, sides(*labels, 0.5, 2.5, 3), 3)
    assert helped.accepted and helped.reason_code == "help" and helped.superiority and helped.stopped_early
    assert helped.looks[-1].outcome == "accept" and helped.delta.ci[0] > 0
    # the first look's level is tiny (O'Brien-Fleming): its interval is wider than a single look's
    single = run(GateConfig(**ONE_LOOK), labels, sides(*labels, 0.5, 2.5, 3), 3)
    assert single.accepted and not single.stopped_early
    assert helped.delta.ci[0] < single.delta.ci[0] and helped.delta.value == single.delta.value


def test_an_unclear_effect_asks_for_more_seeds_then_decides_at_the_last_look(labels):
    s9 = sides(*labels, 1.0, 1.06, 9, seed_noise=0.15, seed=3)
    first = run(GateConfig(), labels, {k: SidePredictions(v.select[:3], v.judge[:3]) for k, v in s9.items()}, 3)
    assert first.looks[-1].outcome == "continue" and not first.accepted
    last = run(GateConfig(), labels, s9, 9)
    assert last.looks[-1].outcome in ("accept", "reject") and not last.stopped_early
    with pytest.raises(DataError, match="not a look"):
        run(GateConfig(), labels, {k: SidePredictions(v.select[:4], v.judge[:4]) for k, v in s9.items()}, 4)


def test_a_moved_decision_boundary_alone_is_not_a_gain(labels):
    """The candidate only raises class b's logit: raw argmax recall of b rises, calibrated metrics do not move."""
    shift = np.array([0.0, 1.5, 0.0, 0.0])
    s = sides(*labels, 1.5, 1.5, 3, shift=shift)
    raw_b = [np.mean(c.argmax(1)[labels[1] == 1] == 1) - np.mean(b.argmax(1)[labels[1] == 1] == 1)
             for b, c in zip(s["baseline"].judge, s["candidate"].judge, strict=True)]
    assert np.mean(raw_b) > 0.2  # uncalibrated, class b's recall would "improve" a lot
    d = run(GateConfig(metric="macro_f1", **ONE_LOOK), labels, s, 3)
    assert abs(d.delta.value) < 0.02 and not d.superiority
    assert abs(d.per_class["b"]["delta"]) < 0.05


def test_a_gain_with_a_collapsing_class_fails_the_recall_check():
    sel = judge = np.repeat(np.arange(K), [100, 40, 40, 60])
    rng = np.random.default_rng(0)
    base, cand = {}, {}
    for part, y in (("select", sel), ("judge", judge)):
        b = np.stack([model_outputs(y, 1.5, rng) for _ in range(3)])
        c = b.copy()
        others = y != 2
        c[:, others, y[others]] += 3.0  # much better on a, b and d...
        rows = np.flatnonzero(y == 2)[::3]
        c[:, rows] = logp(np.array([0.97, 0.01, 0.01, 0.01]))  # ...but a third of class c becomes 'a', confidently
        base[part], cand[part] = b, c - np.logaddexp.reduce(c, axis=2, keepdims=True)
    s = {"baseline": SidePredictions(base["select"], base["judge"]),
         "candidate": SidePredictions(cand["select"], cand["judge"])}
    d = run(GateConfig(**ONE_LOOK), (sel, judge), s, 3)
    assert d.superiority  # the primary metric alone would admit it
    assert not d.accepted and d.reason_code == "check_failed" and d.regressions == ["c"]
    assert "recall of 'c'" in d.reason and d.per_class["c"]["delta"] < -d.per_class["c"]["allowed"]


def test_gate_off_accepts_but_records_what_it_would_have_decided_and_round_trips(labels, tmp_path):
    s = sides(*labels, 1.0, 1.0, 3)
    d = run(GateConfig(enabled=False, **ONE_LOOK), labels, s, 3)
    assert d.accepted and not d.would_accept and d.reason_code == "gate_off"
    d.save(tmp_path)
    back = GateDecision.load(tmp_path)
    assert back == d and back.delta.method == d.delta.method and back.looks == d.looks
    summary = back.summary()
    assert summary["decision"] == "accepted" and summary["delta"]["ci"] == d.delta.ci


def test_bad_predictions_are_named(labels):
    sel, judge = labels
    s = sides(sel, judge, 1.0, 1.0, 3)
    bad = SidePredictions(s["candidate"].select, s["candidate"].judge[:, :-1])
    with pytest.raises(DataError, match="candidate.judge"):
        decide(GateConfig(**ONE_LOOK), classes=CLASSES, select_labels=sel, judge_labels=judge,
               baseline=s["baseline"], candidate=bad, seeds=[0, 1, 2])
    with pytest.raises(DataError, match="paired"):
        decide(GateConfig(**ONE_LOOK), classes=CLASSES, select_labels=sel, judge_labels=judge,
               baseline=s["baseline"], candidate=s["candidate"], seeds=[0, 1])


def test_gate_config_validates_its_design():
    cfg = config_from_dict({"gate": {"seeds_per_look": 2, "max_seeds": 5}})
    assert cfg.gate.look_schedule() == [2, 4, 5]
    assert GateConfig().look_schedule() == [3, 6, 9]
    for bad in ({"max_seeds": 2}, {"judge_fraction": 0.0}, {"margin": -1}, {"admit": "vote"}, {"start": "cold"}):
        with pytest.raises(ConfigError, match="gate"):
            config_from_dict({"gate": bad})


# --------------------------------------------------------------------------- run_gate on tiny real data


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    per_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(10)]

    def part(a, b):
        idx = np.concatenate([i[a:b] for i in per_class])
        return LabelledImages(x[idx], y[idx], [f"digit-{i}" for i in idx], [f"sha-{i}" for i in idx])

    return {"train": part(0, 8), "held": part(8, 48), "select": part(48, 63), "judge": part(63, 93),
            "classes": [str(c) for c in range(10)]}


CLF = ClassifierConfig(arch="resnet10t", model_kwargs={"channels": [16, 32, 64, 128]}, steps=60, batch_size=32,
                       lr=3e-3, warmup_steps=5, label_smoothing=0.0, device="cpu", eval_every=1000)
TINY_GATE = GateConfig(seeds_per_look=2, max_seeds=2, finetune_epochs=20.0, finetune_lr=2e-3, n_bootstrap=200)


def current_model(digits, tmp_path):
    t = digits["train"]
    return train_classifier(CLF, t.images, t.labels, classes=digits["classes"], seed=0, out_dir=tmp_path / "current",
                            progress=False)


def gate(digits, tmp_path, name, candidates, cfg=TINY_GATE, **kw):
    return run_gate(cfg, CLF, train=digits["train"], pool=None, candidates=candidates, select=digits["select"],
                    judge=digits["judge"], classes=digits["classes"], seed=0, out_dir=tmp_path / name,
                    progress=False, **kw)


@pytest.mark.slow
def test_run_gate_accepts_real_help_and_refuses_wrong_labels(digits, tmp_path):
    current = current_model(digits, tmp_path)
    held = digits["held"]
    helped = gate(digits, tmp_path, "helpful", held, current=current)
    assert helped.accepted and helped.superiority, helped.reason
    assert (tmp_path / "helpful" / "decision.json").is_file()
    assert helped.training["models"] == ["baseline-0", "candidate-0", "baseline-1", "candidate-1"]
    assert set(helped.training["judge_ids"]).isdisjoint(helped.training["select_ids"])
    wrong = dataclasses.replace(held, labels=(held.labels + 1) % 10)
    harmed = gate(digits, tmp_path, "wrong", wrong, current=current)
    assert not harmed.accepted and harmed.delta.ci[1] < 0
    # resumed: the finished folders are loaded, not retrained, and the decision is the same
    weights = tmp_path / "wrong" / "candidate-1" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = gate(digits, tmp_path, "wrong", wrong, current=current)
    assert again.delta == harmed.delta and weights.stat().st_mtime_ns == stamp


def test_run_gate_starts_both_sides_from_the_current_weights_and_skips_an_empty_pool(digits, tmp_path):
    current = current_model(digits, tmp_path)
    cfg = dataclasses.replace(TINY_GATE, seeds_per_look=1, max_seeds=1, finetune_epochs=1.0)
    d = gate(digits, tmp_path, "warm", digits["held"].subset(range(20)), cfg=cfg, current=current)
    from vision_si.classifier import load_classifier

    for side in ("baseline", "candidate"):
        meta = load_classifier(tmp_path / "warm" / f"{side}-0").meta
        assert meta["init_from"]["sha256"] == current.checkpoint_sha256
    assert d.training["start"] == "warm"
    empty = gate(digits, tmp_path, "empty", digits["held"].subset([]), cfg=cfg, current=current)
    assert empty.decision == "skipped" and not (tmp_path / "empty" / "candidate-0").exists()
    with pytest.raises(ValueError, match="current model"):
        gate(digits, tmp_path, "nocurrent", digits["held"], cfg=cfg)
