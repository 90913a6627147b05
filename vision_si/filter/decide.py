"""`filter_candidates`: check the inputs, let every filter score every candidate, decide, apply reviews.

The model outputs come in as arrays (`ModelOutputs`), so any critic plugs in; the loop computes them
from round 0's model (`vision_si.stages`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from vision_si.config import FilterConfig
from vision_si.data.arrays import LabelledImages
from vision_si.errors import DataError
from vision_si.filter.base import PRIORITY, REASONS, Candidates, ModelOutputs, RealReference, create_filter
from vision_si.filter.result import ACCEPTED, REJECTED, FilterResult, _column_kind
from vision_si.filter.reviews import _apply_reviews, read_reviews
from vision_si.similarity import pixel_vectors, unit_rows

QUANTILES = {"min": 0, "p01": 1, "p05": 5, "p25": 25, "p50": 50, "p75": 75, "p95": 95, "max": 100}


def _quantiles(values: np.ndarray) -> dict[str, float | None]:
    v = values[np.isfinite(values)]
    if not len(v):
        return {k: None for k in QUANTILES}
    return {k: float(np.percentile(v, q)) for k, q in QUANTILES.items()}


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


def filter_candidates(cfg: FilterConfig, *, candidates: LabelledImages, real_train: LabelledImages,
                      evaluation: LabelledImages, outputs: ModelOutputs, pool: LabelledImages | None = None,
                      reviews: Mapping[str, str] | str | Path | None = None, seed: int = 0) -> FilterResult:
    """Score every candidate with every filter and decide, with the first failing reason in priority order.

    `evaluation` holds the real `val` images followed by `test` (used only to catch leaks);
    `outputs` what the frozen critic says of each set (and the current model of the candidates), row
    for row; `outputs.val_probs` (the critic on the first rows of `evaluation`, real val) is needed
    only when `cfg.fidelity_percentile` is set.
    """
    ids = list(candidates.ids)
    n = len(ids)
    if len(set(ids)) != n:
        dup = sorted({i for i in ids if ids.count(i) > 1})[:3]
        raise DataError(f"candidates: ids must be unique, repeated: {dup}")
    labels, train_labels = candidates.labels, real_train.labels
    if (pool is None) != (outputs.pool_emb is None):
        raise DataError("pool and outputs.pool_emb go together: give both or neither")
    crit_p = _check_probs("outputs.candidate_probs", outputs.candidate_probs, labels)
    cur_p = _check_probs("outputs.current_probs", outputs.current_probs, labels)
    emb = _check_emb("outputs.candidate_emb", outputs.candidate_emb, n)
    dim = emb.shape[1]

    sets = [x.images for x in (candidates, real_train, evaluation, pool) if x is not None and len(x)]
    gray = len({x.shape[1] for x in sets}) > 1  # mixed channel counts: compare luminance
    size = int(min([cfg.pixel_size] + [min(x.shape[2:]) for x in sets]))
    pix = functools.partial(pixel_vectors, size=size, gray=gray)

    cands = Candidates(ids=ids, labels=labels, critic_probs=crit_p, critic_emb=emb, current_probs=cur_p,
                       pixels=pix(candidates.images), sha256=list(candidates.sha256))
    val_p = outputs.val_probs
    val_labels = evaluation.labels[: len(val_p)] if val_p is not None else None
    real = RealReference(
        train_labels=train_labels, train_emb=_check_emb("outputs.train_emb", outputs.train_emb, len(real_train), dim),
        train_pixels=pix(real_train.images),
        eval_emb=_check_emb("outputs.eval_emb", outputs.eval_emb, len(evaluation), dim),
        eval_pixels=pix(evaluation.images), eval_sha256=list(evaluation.sha256),
        pool_emb=_check_emb("outputs.pool_emb", outputs.pool_emb, len(pool), dim) if pool is not None else None,
        pool_pixels=pix(pool.images) if pool is not None else None,
        val_critic_probs=_check_probs("outputs.val_probs", val_p, val_labels) if val_p is not None else None,
        val_labels=val_labels, seed=seed)

    enabled = [name for name in PRIORITY if name == "leakage" or name in cfg.enabled]
    scores: dict[str, np.ndarray] = {}
    passed: dict[str, np.ndarray] = {}
    thresholds: dict[str, dict[str, Any]] = {}
    fitted = {}  # name → the fitted filter
    for name in PRIORITY:  # every filter scores every candidate, enabled or not
        f = fitted[name] = create_filter(name, cfg).fit(real)
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
        row.update(decision=REJECTED if failed else ACCEPTED, reason=failed[0] if failed else "",
                   failed=";".join(failed), overridden=False)
        rows.append(row)

    if reviews is not None and not isinstance(reviews, Mapping):
        reviews = read_reviews(reviews)
    overridden, refused = _apply_reviews(rows, reviews) if reviews else ([], [])

    counts = {REASONS[name]: 0 for name in PRIORITY}
    for r in rows:
        if r["decision"] == REJECTED:
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
    return FilterResult(rows=rows, accepted_ids=[r["id"] for r in rows if r["decision"] == ACCEPTED],
                        counts=counts, thresholds=thresholds, enabled=enabled,
                        leak_pixel_threshold=float(fitted["leakage"].pixel_threshold_), overridden_ids=overridden,
                        review_refused_ids=refused, closest_real=closest, config=asdict(cfg))
