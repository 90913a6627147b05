"""Classification metrics and their intervals, on plain arrays.

A functional core shared by diagnosis, the gate and the final report: `labels` are integer class
indices, `preds` integer predictions (or `probs`, an N×K array). Every interval is a two-sided
interval at `confidence`; every bootstrap takes an explicit seed.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats
from sklearn.metrics import confusion_matrix


def wilson_interval(successes: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion; (0, 1) when `total` is 0."""
    if total <= 0:
        return 0.0, 1.0
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def per_class_scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Recall, precision and F1 per class from a confusion matrix (rows: true, columns: predicted)."""
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, 0.0)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(recall + precision > 0, 2 * recall * precision / (recall + precision), 0.0)
    return {"recall": recall, "precision": precision, "f1": f1, "support": support}


def _scores_from_cm(cm: np.ndarray) -> dict[str, float]:
    s = per_class_scores(cm)
    present = s["support"] > 0
    total = cm.sum()
    return {
        "accuracy": float(np.trace(cm) / total) if total else 0.0,
        "balanced_accuracy": float(s["recall"][present].mean()) if present.any() else 0.0,
        "macro_f1": float(s["f1"][present].mean()) if present.any() else 0.0,
    }


def classification_metrics(labels: np.ndarray, preds: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, balanced accuracy, macro-F1 and per-class recall/precision/F1/support.

    Macro averages run over the classes present in `labels`, as scikit-learn's balanced accuracy does.
    """
    labels = np.asarray(labels, dtype=int)
    preds = np.asarray(preds, dtype=int)
    cm = confusion_matrix(labels, preds, labels=list(range(len(classes))))
    s = per_class_scores(cm)
    out: dict = _scores_from_cm(cm)
    out["per_class"] = {
        name: {"recall": float(s["recall"][k]), "precision": float(s["precision"][k]),
               "f1": float(s["f1"][k]), "support": int(s["support"][k])}
        for k, name in enumerate(classes)
    }
    out["confusion"] = cm.tolist()
    return out


def _bootstrap_indices(n: int, n_bootstrap: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))


def _batched_cms(labels: np.ndarray, preds: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """Confusion matrices of every bootstrap resample at once: (B, k, k)."""
    codes = labels[idx] * k + preds[idx]
    b = idx.shape[0]
    flat = codes + (np.arange(b)[:, None] * k * k)
    counts = np.bincount(flat.ravel(), minlength=b * k * k)
    return counts.reshape(b, k, k)


def metric_samples(labels: np.ndarray, preds: np.ndarray, k: int, idx: np.ndarray, metric: str,
                   weak_classes: list[int] | None = None) -> np.ndarray:
    """The value of `metric` on each bootstrap resample given by `idx` (B×N indices)."""
    cms = _batched_cms(np.asarray(labels, int), np.asarray(preds, int), idx, k).astype(float)
    tp = np.diagonal(cms, axis1=1, axis2=2)
    support = cms.sum(axis=2)
    predicted = cms.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / np.maximum(support, 1), np.nan)
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        f1 = np.where(recall + precision > 0, 2 * recall * precision / (recall + precision), 0.0)
    f1 = np.where(support > 0, f1, np.nan)
    if metric == "accuracy":
        return tp.sum(axis=1) / idx.shape[1]
    if metric == "balanced_accuracy":
        return np.nanmean(recall, axis=1)
    if metric == "macro_f1":
        return np.nanmean(f1, axis=1)
    if metric == "weak_class_recall":
        if not weak_classes:
            raise ValueError("metric 'weak_class_recall' needs weak_classes (a non-empty list of class indices)")
        return np.nanmean(recall[:, weak_classes], axis=1)
    raise ValueError(f"unknown metric {metric!r}; allowed: accuracy, balanced_accuracy, macro_f1, weak_class_recall")


def _seed_indices(n_seeds: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """Seeds drawn with replacement for each resample (B×S), from a stream apart from the image draws.

    The image draws stay those of `_bootstrap_indices(n, B, seed)`, so when every seed's
    predictions are the same the seed-resampled interval is the image-only one, exactly.
    """
    return np.random.default_rng((seed, 1)).integers(0, n_seeds, size=(n_bootstrap, n_seeds))


def _over_seeds(per_seed: np.ndarray, seed_idx: np.ndarray | None) -> np.ndarray:
    """Mean over seeds of per-seed samples (S×B): all seeds, or those drawn for each resample (B×S)."""
    if seed_idx is None:
        return per_seed.mean(axis=0)
    return np.take_along_axis(per_seed.T, seed_idx, axis=1).mean(axis=1)


def bootstrap_interval(labels: np.ndarray, preds: np.ndarray, k: int, metric: str, *, n_bootstrap: int = 1000,
                       confidence: float = 0.95, seed: int = 0, weak_classes: list[int] | None = None,
                       resample_seeds: bool = False) -> tuple[float, float]:
    """Percentile bootstrap interval of `metric` over resampled images.

    `preds` may be 2-D (seeds × N): the metric is then averaged over seeds on each resample. With
    `resample_seeds`, each resample also draws the seeds (rows) with replacement, so the interval
    covers the spread between trainings as well as the choice of images.
    """
    labels = np.asarray(labels, int)
    if labels.size == 0:
        return 0.0, 1.0
    idx = _bootstrap_indices(labels.size, n_bootstrap, seed)
    rows = np.atleast_2d(np.asarray(preds, int))
    per_seed = np.stack([metric_samples(labels, p, k, idx, metric, weak_classes) for p in rows])
    seed_idx = _seed_indices(len(rows), n_bootstrap, seed) if resample_seeds else None
    samples = _over_seeds(per_seed, seed_idx)
    lo, hi = np.nanpercentile(samples, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(lo), float(hi)


def paired_bootstrap(labels: np.ndarray, preds_a: np.ndarray, preds_b: np.ndarray, k: int, metric: str, *,
                     n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0,
                     weak_classes: list[int] | None = None, resample_seeds: bool = False) -> dict:
    """Difference `metric(b) - metric(a)` on the same resampled images, with its percentile interval.

    `preds_a`/`preds_b` may be 2-D (seeds × N, row s of both sides trained with the same seed): the
    metric is then averaged over seeds on each resample, so the decision rests on the paired mean
    of several trainings. A bootstrap over images alone does not see training noise (two trainings
    on the same data differ). With `resample_seeds` each resample also draws seed pairs with
    replacement (row s of a and of b together) and the same images for all of them: seeds and
    images are crossed factors, both resampled, so the interval widens with the disagreement
    between seeds. With one seed, or seeds whose predictions agree, it equals the image-only one.

    Also returns `per_seed_delta` (each pair's difference on all images) and `seed_sd`, their
    standard deviation between seeds (None with one seed).
    """
    labels = np.asarray(labels, int)
    a = np.atleast_2d(np.asarray(preds_a, int))
    b = np.atleast_2d(np.asarray(preds_b, int))
    if a.shape[1] != labels.size or b.shape[1] != labels.size:
        raise ValueError(f"predictions cover {a.shape[1]} and {b.shape[1]} images, labels {labels.size}")
    if resample_seeds and a.shape[0] != b.shape[0]:
        raise ValueError(f"resample_seeds pairs rows: {a.shape[0]} and {b.shape[0]} seeds")
    idx = _bootstrap_indices(labels.size, n_bootstrap, seed)
    seed_idx = _seed_indices(a.shape[0], n_bootstrap, seed) if resample_seeds else None
    sa = _over_seeds(np.stack([metric_samples(labels, p, k, idx, metric, weak_classes) for p in a]), seed_idx)
    sb = _over_seeds(np.stack([metric_samples(labels, p, k, idx, metric, weak_classes) for p in b]), seed_idx)
    diff = sb - sa
    full = np.arange(labels.size)[None, :]
    va = np.array([metric_samples(labels, p, k, full, metric, weak_classes)[0] for p in a])
    vb = np.array([metric_samples(labels, p, k, full, metric, weak_classes)[0] for p in b])
    point_a, point_b = float(va.mean()), float(vb.mean())
    lo, hi = np.nanpercentile(diff, [50 * (1 - confidence), 50 * (1 + confidence)])
    per_seed = (vb - va).tolist() if len(va) == len(vb) else []
    return {"a": point_a, "b": point_b, "delta": point_b - point_a, "lower": float(lo), "upper": float(hi),
            "p_not_better": float(np.mean(diff <= 0)), "per_seed_delta": per_seed,
            "seed_sd": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins."""
    probs = np.asarray(probs, float)
    labels = np.asarray(labels, int)
    if labels.size == 0:
        return 0.0
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def bootstrap_confusions(cm: np.ndarray, n_bootstrap: int = 1000, seed: int = 0) -> np.ndarray:
    """Confusion matrices of `n_bootstrap` image resamples, drawn without touching the images: (B, K, K).

    Resampling N images with replacement and tallying them gives exactly a multinomial draw of the
    N cells with the observed cell frequencies, so this has the same distribution as the
    index-based bootstrap above, in memory B·K² instead of B·N (what 200,000 images need).
    """
    cm = np.asarray(cm, dtype=np.int64)
    k = cm.shape[0]
    total = int(cm.sum())
    if total == 0:
        return np.zeros((n_bootstrap, k, k), dtype=np.int64)
    draws = np.random.default_rng(seed).multinomial(total, cm.ravel() / total, size=n_bootstrap)
    return draws.reshape(n_bootstrap, k, k)


def confusion_metric_samples(cms: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy, macro-F1 (B,) and per-class recall/precision/F1 (B, K) of each matrix.

    Per-class values are NaN where a resample has no image of the class (recall, F1) or no
    prediction of it (precision), so percentiles skip resamples where the value is undefined.
    """
    cms = np.asarray(cms, dtype=float)
    tp = np.diagonal(cms, axis1=1, axis2=2)
    support = cms.sum(axis=2)
    predicted = cms.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / np.maximum(support, 1), np.nan)
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), np.nan)
        p0 = np.nan_to_num(precision)
        r0 = np.nan_to_num(recall)
        f1 = np.where(r0 + p0 > 0, 2 * r0 * p0 / (r0 + p0), 0.0)
        f1 = np.where(support > 0, f1, np.nan)
        total = cms.sum(axis=(1, 2))
        return {
            "accuracy": tp.sum(axis=1) / np.maximum(total, 1),
            "balanced_accuracy": np.nanmean(recall, axis=1),
            "macro_f1": np.nanmean(f1, axis=1),
            "recall": recall, "precision": precision, "f1": f1,
        }
