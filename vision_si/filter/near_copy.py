"""The near-copy filters: memorisation (real train), leakage (val/test), duplicate (pool and earlier candidates)."""

from __future__ import annotations

import numpy as np

from vision_si.config import FilterConfig
from vision_si.filter.base import CandidateFilter, Candidates, RealReference, register_filter
from vision_si.similarity import greedy_unique, max_similarity, near_copy_pairs


def _at_least(values: np.ndarray, threshold: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(values, nan=-np.inf) >= threshold


class _NearCopyFilter(CandidateFilter):
    """Shared shape of memorisation and leakage: the closest reference image by cosine and by pixels."""

    def __init__(self, cosine: float, pixel: float) -> None:
        self.cosine = cosine
        self.pixel = pixel

    def _nearest(self, cands: Candidates, emb: np.ndarray, pix: np.ndarray) -> np.ndarray:
        cos, cos_i = max_similarity(cands.critic_emb, emb)
        pxs, pix_i = max_similarity(cands.pixels, pix)
        return np.stack([cos, pxs, cos_i, pix_i], axis=1).astype(np.float64)

    def _near(self, scores: np.ndarray) -> np.ndarray:
        return _at_least(scores[:, 0], self.cosine_threshold_) | _at_least(scores[:, 1], self.pixel_threshold_)

    def _set_thresholds(self, real: RealReference, percentile: float | None) -> None:
        """The fixed thresholds, or with `percentile` that percentile of real train's nearest-other-real
        similarities: a near-copy is then closer than real images come to each other."""
        self.cosine_threshold_, self.pixel_threshold_ = float(self.cosine), float(self.pixel)
        if percentile is not None:
            cos, pix = real.train_self_similarity
            if np.isfinite(cos).any():
                self.cosine_threshold_ = float(np.nanpercentile(cos, percentile))
                self.pixel_threshold_ = float(np.nanpercentile(pix, percentile))


@register_filter("memorisation")
class MemorisationFilter(_NearCopyFilter):
    columns = ("memorisation_cosine", "memorisation_pixel", "nearest_real_cosine_index", "nearest_real_pixel_index")

    def __init__(self, cosine: float = 0.98, pixel: float = 0.95, percentile: float | None = None) -> None:
        super().__init__(cosine, pixel)
        self.percentile = percentile

    @classmethod
    def from_config(cls, cfg: FilterConfig) -> MemorisationFilter:
        return cls(cfg.memorisation_cosine, cfg.memorisation_pixel, cfg.memorisation_percentile)

    def fit(self, real: RealReference) -> MemorisationFilter:
        self.train_emb_, self.train_pixels_ = real.train_emb, real.train_pixels
        self._set_thresholds(real, self.percentile)
        return self

    def score(self, cands: Candidates) -> np.ndarray:
        self._check_fitted()
        return self._nearest(cands, self.train_emb_, self.train_pixels_)

    def accept(self, scores: np.ndarray) -> np.ndarray:
        self._check_fitted()
        return ~self._near(scores)


@register_filter("leakage")
class LeakageFilter(_NearCopyFilter):
    columns = ("leak_cosine", "leak_pixel", "nearest_eval_cosine_index", "nearest_eval_pixel_index", "leak_sha256")

    def __init__(self, cosine: float = 0.98, pixel: float = 0.95, percentile: float | None = None) -> None:
        super().__init__(cosine, pixel)
        self.percentile = percentile

    @classmethod
    def from_config(cls, cfg: FilterConfig) -> LeakageFilter:
        return cls(cfg.leak_cosine, cfg.leak_pixel, cfg.leak_percentile)

    def fit(self, real: RealReference) -> LeakageFilter:
        self.eval_emb_, self.eval_pixels_ = real.eval_emb, real.eval_pixels
        self.eval_sha256_ = frozenset(real.eval_sha256 or ())
        self._set_thresholds(real, self.percentile)  # exact byte copies are caught by sha256 anyway
        return self

    def score(self, cands: Candidates) -> np.ndarray:
        self._check_fitted()
        same = [float(h in self.eval_sha256_) for h in cands.sha256] if cands.sha256 else [0.0] * len(cands)
        return np.column_stack([self._nearest(cands, self.eval_emb_, self.eval_pixels_), same])

    def accept(self, scores: np.ndarray) -> np.ndarray:
        self._check_fitted()
        return ~(self._near(scores) | (scores[:, 4] > 0))


@register_filter("duplicate")
class DuplicateFilter(_NearCopyFilter):
    """Similarity to the accepted pool and to the kept candidates before it in id order (the first stays)."""

    columns = ("duplicate_cosine", "duplicate_pixel")

    def __init__(self, cosine: float = 0.995, pixel: float = 0.98) -> None:
        super().__init__(cosine, pixel)

    @classmethod
    def from_config(cls, cfg: FilterConfig) -> DuplicateFilter:
        return cls(cfg.duplicate_cosine, cfg.duplicate_pixel)

    def fit(self, real: RealReference) -> DuplicateFilter:
        dim_e, dim_p = real.train_emb.shape[1], real.train_pixels.shape[1]
        self.pool_emb_ = real.pool_emb if real.pool_emb is not None else np.zeros((0, dim_e), np.float32)
        self.pool_pixels_ = real.pool_pixels if real.pool_pixels is not None else np.zeros((0, dim_p), np.float32)
        self.cosine_threshold_, self.pixel_threshold_ = float(self.cosine), float(self.pixel)
        return self

    def score(self, cands: Candidates) -> np.ndarray:
        self._check_fitted()
        pool = np.stack([max_similarity(cands.critic_emb, self.pool_emb_)[0],
                         max_similarity(cands.pixels, self.pool_pixels_)[0]], axis=1).astype(np.float64)
        order = np.argsort(np.asarray(cands.ids, dtype=object), kind="stable")
        rank = np.empty(len(cands), np.int64)
        rank[order] = np.arange(len(cands))
        kept = greedy_unique(order, [near_copy_pairs(cands.critic_emb, self.cosine_threshold_),
                                     near_copy_pairs(cands.pixels, self.pixel_threshold_)], blocked=self._near(pool))
        earlier = np.full((len(cands), 2), np.nan)
        keep_idx = np.flatnonzero(kept)
        if len(keep_idx):
            for col, vecs in enumerate((cands.critic_emb, cands.pixels)):
                for start in range(0, len(cands), 2048):
                    sims = vecs[start:start + 2048] @ vecs[keep_idx].T
                    before = rank[keep_idx][None, :] < rank[start:start + 2048, None]
                    best = np.where(before, sims, -np.inf).max(axis=1)
                    earlier[start:start + 2048, col] = np.where(np.isfinite(best), best, np.nan)
        return np.fmax(pool, earlier)

    def accept(self, scores: np.ndarray) -> np.ndarray:
        self._check_fitted()
        return ~self._near(scores)
