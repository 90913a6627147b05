"""Metrics and intervals agree with scikit-learn and behave as intervals should."""

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from vision_si.metrics import (
    bootstrap_interval,
    classification_metrics,
    expected_calibration_error,
    paired_bootstrap,
    wilson_interval,
)


def test_point_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    p = np.where(rng.random(300) < 0.6, y, rng.integers(0, 4, 300))
    m = classification_metrics(y, p, ["a", "b", "c", "d"])
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
    assert m["accuracy"] == pytest.approx((y == p).mean())
    assert sum(c["support"] for c in m["per_class"].values()) == 300


def test_wilson_interval_covers_the_truth_at_about_the_nominal_rate():
    rng = np.random.default_rng(1)
    p_true, n = 0.1, 40
    hits = [lo <= p_true <= hi for lo, hi in (wilson_interval(int(k), n) for k in rng.binomial(n, p_true, 2000))]
    assert 0.92 <= np.mean(hits) <= 0.99


def test_bootstrap_interval_brackets_the_point_value():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 200)
    p = np.where(rng.random(200) < 0.7, y, (y + 1) % 3)
    lo, hi = bootstrap_interval(y, p, 3, "macro_f1", seed=0)
    point = f1_score(y, p, average="macro")
    assert lo < point < hi and hi - lo < 0.3


def test_paired_bootstrap_sees_no_gain_in_identical_predictions_and_a_gain_in_better_ones():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 400)
    a = np.where(rng.random(400) < 0.6, y, (y + 1) % 3)
    same = paired_bootstrap(y, a, a, 3, "macro_f1", seed=0)
    assert same["delta"] == 0 and same["lower"] == 0 and same["upper"] == 0
    b = a.copy()
    fix = rng.random(400) < 0.3
    b[fix] = y[fix]  # b is a with 30% of its mistakes corrected
    gain = paired_bootstrap(y, a, b, 3, "balanced_accuracy", seed=0)
    assert gain["lower"] > 0 and gain["delta"] > 0
    worse = paired_bootstrap(y, b, a, 3, "balanced_accuracy", seed=0)
    assert worse["upper"] < 0


def test_paired_bootstrap_averages_over_seeds():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 100)
    seeds_a = np.stack([np.where(rng.random(100) < 0.5, y, 1 - y) for _ in range(3)])
    out = paired_bootstrap(y, seeds_a, np.stack([y, y, y]), 2, "accuracy", seed=0)
    assert out["b"] == pytest.approx(1.0)
    assert out["a"] == pytest.approx(np.mean([(s == y).mean() for s in seeds_a]))
    with pytest.raises(ValueError, match="weak_classes"):
        paired_bootstrap(y, y, y, 2, "weak_class_recall")


def test_ece_is_zero_for_a_calibrated_certain_model_and_large_for_an_overconfident_one():
    y = np.array([0, 1, 1, 0])
    assert expected_calibration_error(np.eye(2)[y], y) == 0
    wrong = np.eye(2)[1 - y] * 0.99 + 0.005
    assert expected_calibration_error(wrong, y) > 0.9
