"""The filters that judge a candidate against its intended class: fidelity, informativeness, realism."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.neighbors import LocalOutlierFactor, NearestNeighbors

from vision_si.config import FilterConfig
from vision_si.errors import InputError
from vision_si.filter.base import CandidateFilter, Candidates, RealReference, register_filter


def _true_class(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return probs[np.arange(len(labels)), labels].astype(np.float64)


@register_filter("fidelity")
class FidelityFilter(CandidateFilter):
    columns = ("fidelity",)

    def __init__(self, threshold: float = 0.5, percentile: float | None = None) -> None:
        self.threshold = threshold
        self.percentile = percentile

    @classmethod
    def from_config(cls, cfg: FilterConfig) -> FidelityFilter:
        return cls(cfg.fidelity_min, cfg.fidelity_percentile)

    def fit(self, real: RealReference) -> FidelityFilter:
        if self.percentile is None:
            self.threshold_ = float(self.threshold)
            return self
        if real.val_critic_probs is None or real.val_labels is None or not len(real.val_labels):
            raise InputError("filter.fidelity_percentile needs the critic's probabilities on real val images "
                             "(real_val_critic_probs and real_val_labels)")
        self.threshold_ = float(np.percentile(_true_class(real.val_critic_probs, real.val_labels), self.percentile))
        return self

    def score(self, cands: Candidates) -> np.ndarray:
        self._check_fitted()
        return _true_class(cands.critic_probs, cands.labels)[:, None]

    def accept(self, scores: np.ndarray) -> np.ndarray:
        self._check_fitted()
        return scores[:, 0] >= self.threshold_


@register_filter("informativeness")
class InformativenessFilter(CandidateFilter):
    columns = ("informativeness",)

    def __init__(self, threshold: float = 0.95) -> None:
        self.threshold = threshold

    @classmethod
    def from_config(cls, cfg: FilterConfig) -> InformativenessFilter:
        return cls(cfg.informativeness_max)

    def fit(self, real: RealReference) -> InformativenessFilter:
        self.threshold_ = float(self.threshold)
        return self

    def score(self, cands: Candidates) -> np.ndarray:
        self._check_fitted()
        return _true_class(cands.current_probs, cands.labels)[:, None]

    def accept(self, scores: np.ndarray) -> np.ndarray:
        self._check_fitted()
        return scores[:, 0] <= self.threshold_


@register_filter("realism")
class RealismFilter(CandidateFilter):
    """Outlier score against the real class; a class with fewer than 2 real images cannot judge (NaN, passes)."""

    columns = ("realism_score", "realism_threshold")

    def __init__(self, k: int = 5, percentile: float = 99.0, method: str = "knn") -> None:
        self.k = k
        self.percentile = percentile
        self.method = method

    @classmethod
    def from_config(cls, cfg: FilterConfig) -> RealismFilter:
        return cls(cfg.realism_k, cfg.realism_percentile, cfg.realism_method)

    def fit(self, real: RealReference) -> RealismFilter:
        if self.method not in ("knn", "lof"):
            raise InputError(f"filter.realism_method: {self.method!r} is not one of ['knn', 'lof']")
        self.models_: dict[int, Any] = {}
        self.class_thresholds_: dict[int, float] = {}
        for c in np.unique(real.train_labels):
            x = real.train_emb[real.train_labels == c]
            k = min(self.k, len(x) - 1)
            if k < 1:
                continue
            if self.method == "knn":
                model = NearestNeighbors(n_neighbors=k + 1).fit(x)
                dist, _ = model.kneighbors(x)
                own = dist[:, 1:].mean(axis=1)  # column 0 is the image itself: leave it out
            else:
                model = LocalOutlierFactor(n_neighbors=k, novelty=True).fit(x)
                own = -model.negative_outlier_factor_
            self.models_[int(c)] = (model, k)
            self.class_thresholds_[int(c)] = float(np.percentile(own, self.percentile))
        return self

    def score(self, cands: Candidates) -> np.ndarray:
        self._check_fitted()
        out = np.full((len(cands), 2), np.nan)
        for c, (model, k) in self.models_.items():
            rows = np.flatnonzero(cands.labels == c)
            if not len(rows):
                continue
            x = cands.critic_emb[rows]
            if self.method == "knn":
                out[rows, 0] = model.kneighbors(x, n_neighbors=k)[0].mean(axis=1)
            else:
                out[rows, 0] = -model.score_samples(x)
            out[rows, 1] = self.class_thresholds_[c]
        return out

    def accept(self, scores: np.ndarray) -> np.ndarray:
        self._check_fitted()
        with np.errstate(invalid="ignore"):
            return ~(scores[:, 0] > scores[:, 1])
