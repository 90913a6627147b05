"""`filter_candidates`: check the inputs, let every filter score every candidate, decide, apply reviews.

`score_with_models` computes the model outputs it needs from a critic and the current model.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from vision_si.classifier import TrainedClassifier, predict
from vision_si.config import FilterConfig
from vision_si.errors import DataError
from vision_si.filter.base import PRIORITY, REASONS, Candidates, RealReference, create_filter
from vision_si.filter.result import FilterResult, _column_kind
from vision_si.filter.reviews import _apply_reviews, read_reviews
from vision_si.similarity import check_images, pixel_vectors, unit_rows

QUANTILES = {"min": 0, "p01": 1, "p05": 5, "p25": 25, "p50": 50, "p75": 75, "p95": 95, "max": 100}


def _quantiles(values: np.ndarray) -> dict[str, float | None]:
    v = values[np.isfinite(values)]
    if not len(v):
        return {k: None for k in QUANTILES}
    return {k: float(np.percentile(v, q)) for k, q in QUANTILES.items()}


def _check_len(name: str, arr: Any, n: int) -> None:
    if arr is not None and len(arr) != n:
        raise DataError(f"{name}: has {len(arr)} rows, expected {n} (one per image)")


def _check_probs(name: str, probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[0] != len(labels):
        raise DataError(f"{name}: expected shape ({len(labels)}, n_classes), got {probs.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise DataError(f"{name}: labels reach class {labels.max()} but the probabilities have {probs.shape[1]} columns")
    return probs


def _check_emb(name: str, emb: Any, n: int, dim: int | None = None) -> np.ndarray:
    emb = np.asarray(emb, np.float32)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise DataError(f"{name}: expected shape ({n}, dim), got {emb.shape}")
    if dim is not None and emb.shape[1] != dim:
        raise DataError(f"{name}: embeddings have {emb.shape[1]} features, the candidates' have {dim}")
    return unit_rows(emb)


def filter_candidates(cfg: FilterConfig, *, candidate_ids: Sequence[str], candidate_labels: np.ndarray,
                      candidate_images: np.ndarray, candidate_critic_probs: np.ndarray,
                      candidate_critic_emb: np.ndarray, candidate_current_probs: np.ndarray,
                      real_train_images: np.ndarray, real_train_labels: np.ndarray, real_train_emb: np.ndarray,
                      eval_images: np.ndarray, eval_emb: np.ndarray, eval_sha256: Sequence[str] | None = None,
                      candidate_sha256: Sequence[str] | None = None, pool_images: np.ndarray | None = None,
                      pool_emb: np.ndarray | None = None, reviews: Mapping[str, str] | str | Path | None = None,
                      seed: int = 0, real_val_critic_probs: np.ndarray | None = None,
                      real_val_labels: np.ndarray | None = None) -> FilterResult:
    """Score every candidate with every filter and decide, with the first failing reason in priority order.

    Embeddings come from the frozen critic (candidates, real train, eval, pool alike); `eval_*` are the
    `val` and `test` images, used only to catch leaks. `real_val_*` (the critic's probabilities on
    real val) are needed only when `cfg.fidelity_percentile` is set.
    """
    ids = [str(i) for i in candidate_ids]
    n = len(ids)
    if len(set(ids)) != n:
        dup = sorted({i for i in ids if ids.count(i) > 1})[:3]
        raise DataError(f"candidate_ids: ids must be unique, repeated: {dup}")
    labels = np.asarray(candidate_labels, np.int64)
    train_labels = np.asarray(real_train_labels, np.int64)
    cand_x = check_images(candidate_images, "candidate_images")
    train_x = check_images(real_train_images, "real_train_images")
    eval_x = check_images(eval_images, "eval_images")
    pool_x = check_images(pool_images, "pool_images") if pool_images is not None else None
    _check_len("candidate_labels", labels, n)
    _check_len("candidate_images", cand_x, n)
    _check_len("candidate_sha256", candidate_sha256, n)
    _check_len("real_train_labels", train_labels, len(train_x))
    _check_len("eval_sha256", eval_sha256, len(eval_x))
    if (pool_x is None) != (pool_emb is None):
        raise DataError("pool_images and pool_emb go together: give both or neither")
    crit_p = _check_probs("candidate_critic_probs", candidate_critic_probs, labels)
    cur_p = _check_probs("candidate_current_probs", candidate_current_probs, labels)
    emb = _check_emb("candidate_critic_emb", candidate_critic_emb, n)
    dim = emb.shape[1]

    sets = [x for x in (cand_x, train_x, eval_x, pool_x) if x is not None and len(x)]
    gray = len({x.shape[1] for x in sets}) > 1  # mixed channel counts: compare luminance
    size = int(min([cfg.pixel_size] + [min(x.shape[2:]) for x in sets]))
    pix = functools.partial(pixel_vectors, size=size, gray=gray)

    cands = Candidates(ids=ids, labels=labels, critic_probs=crit_p, critic_emb=emb, current_probs=cur_p,
                       pixels=pix(cand_x), sha256=list(candidate_sha256) if candidate_sha256 is not None else None)
    val_labels = np.asarray(real_val_labels, np.int64) if real_val_labels is not None else None
    real = RealReference(
        train_labels=train_labels, train_emb=_check_emb("real_train_emb", real_train_emb, len(train_x), dim),
        train_pixels=pix(train_x), eval_emb=_check_emb("eval_emb", eval_emb, len(eval_x), dim),
        eval_pixels=pix(eval_x), eval_sha256=list(eval_sha256) if eval_sha256 is not None else None,
        pool_emb=_check_emb("pool_emb", pool_emb, len(pool_x), dim) if pool_x is not None else None,
        pool_pixels=pix(pool_x) if pool_x is not None else None,
        val_critic_probs=(_check_probs("real_val_critic_probs", real_val_critic_probs, val_labels)
                          if real_val_critic_probs is not None and val_labels is not None else None),
        val_labels=val_labels, seed=seed)

    enabled = [name for name in PRIORITY if name == "leakage" or name in cfg.enabled]
    scores: dict[str, np.ndarray] = {}
    passed: dict[str, np.ndarray] = {}
    thresholds: dict[str, dict[str, Any]] = {}
    for name in PRIORITY:  # every filter scores every candidate, enabled or not
        f = create_filter(name, cfg).fit(real)
        s = f.score(cands)
        scores.update({col: s[:, j] for j, col in enumerate(f.columns)})
        passed[name] = f.accept(s)
        thresholds[name] = f.thresholds() | ({"per_class": f.class_thresholds_} if name == "realism" else {})

    rows = []
    for i in range(n):
        failed = [REASONS[name] for name in enabled if not passed[name][i]]
        row: dict[str, Any] = {"id": ids[i], "class": int(labels[i])}
        for col, v in scores.items():
            row[col] = int(v[i]) if _column_kind(col) == "int" else float(v[i])
        row.update(decision="rejected" if failed else "accepted", reason=failed[0] if failed else "",
                   failed=";".join(failed), overridden=False)
        rows.append(row)

    if reviews is not None and not isinstance(reviews, Mapping):
        reviews = read_reviews(reviews)
    overridden, refused = _apply_reviews(rows, reviews) if reviews else ([], [])

    counts = {REASONS[name]: 0 for name in PRIORITY}
    for r in rows:
        if r["decision"] == "rejected":
            counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    base_cos, base_pix = real.train_self_similarity
    closest = {
        "what": "distance = 1 - similarity to the nearest real training image (embedding cosine; pixel "
                "correlation at the pixel size); real_train: real training images to their nearest other one",
        "pixel_size": size,
        "candidates": {"cosine_distance": _quantiles(1 - scores["memorisation_cosine"]),
                       "pixel_distance": _quantiles(1 - scores["memorisation_pixel"])},
        "real_train": {"cosine_distance": _quantiles(1 - base_cos), "pixel_distance": _quantiles(1 - base_pix),
                       "n_sampled": int(len(base_cos))},
    }
    return FilterResult(rows=rows, accepted_ids=[r["id"] for r in rows if r["decision"] == "accepted"],
                        counts=counts, thresholds=thresholds, enabled=enabled, overridden_ids=overridden,
                        review_refused_ids=refused, closest_real=closest, config=asdict(cfg))


def score_with_models(critic: TrainedClassifier, current: TrainedClassifier, *, candidate_images: np.ndarray, real_train_images: np.ndarray,
                      eval_images: np.ndarray, pool_images: np.ndarray | None = None,
                      real_val_images: np.ndarray | None = None, batch_size: int = 256) -> dict[str, Any]:
    """The model outputs `filter_candidates` needs, from a critic and the current model (`TrainedClassifier`s).

    Returns keyword arguments: `filter_candidates(cfg, **score_with_models(...), candidate_ids=...,
    candidate_labels=..., candidate_images=..., real_train_images=..., ...)`. The critic must be a
    model trained on real data only (round 0's by default), never the one being improved.
    """
    crit = predict(critic, candidate_images, batch_size=batch_size)
    out: dict[str, Any] = {
        "candidate_critic_probs": crit.probs, "candidate_critic_emb": crit.embeddings,
        "candidate_current_probs": predict(current, candidate_images, batch_size=batch_size).probs,
        "real_train_emb": predict(critic, real_train_images, batch_size=batch_size).embeddings,
        "eval_emb": predict(critic, eval_images, batch_size=batch_size).embeddings,
    }
    if pool_images is not None and len(pool_images):
        out["pool_emb"] = predict(critic, pool_images, batch_size=batch_size).embeddings
    if real_val_images is not None:
        out["real_val_critic_probs"] = predict(critic, real_val_images, batch_size=batch_size).probs
    return out
