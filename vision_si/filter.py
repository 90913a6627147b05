"""The filter: every synthetic candidate gets every score, one decision and the reason for it.

A functional core on plain arrays (class indices, probabilities, embeddings, images), so any model
plugs in. Six filters, each in the scikit-learn shape (parameters in `__init__`, `fit(real)` learns
from real data only and returns self, learned state ends in `_`, `score(candidates)` gives an
N × len(columns) array, `accept(scores)` a boolean mask), registered by name:

==================  ===========  ==============================================================
filter              reason       rejects a candidate when
==================  ===========  ==============================================================
leakage             leak         it is a near-copy of a `val`/`test` image (embedding cosine ≥
                                 `leak_cosine`, pixel correlation ≥ `leak_pixel`, or the
                                 `leak_percentile` of real train's own nearest-other-real
                                 similarities (the default); or the same sha256). Always on, whatever `enabled` says; a human review
                                 cannot accept it either: an evaluation image in training
                                 invalidates every later measurement.
memorisation        memorised    it is a near-copy of a real training image (cosine ≥
                                 `memorisation_cosine` or pixel ≥ `memorisation_pixel`, or the
                                 `memorisation_percentile` of real train's own nearest-other-real
                                 similarities). A privacy matter for medical data.
fidelity            off_class    the critic's probability of the intended class < `fidelity_min`
                                 (or the `fidelity_percentile` of that probability on real val).
realism             unrealistic  its mean distance to the `realism_k` nearest real training images
                                 of its class (unit-length critic embeddings) is above the
                                 `realism_percentile` of the same distance for the real images
                                 themselves, leave-one-out; or, with `realism_method: lof`, the
                                 LocalOutlierFactor(novelty=True) score against that percentile.
duplicate           duplicate    it is a near-copy (`duplicate_cosine`/`duplicate_pixel`) of an
                                 image already in the accepted pool, or of a candidate earlier in
                                 id order that is itself kept.
informativeness     too_easy     the current model's probability of the intended class >
                                 `informativeness_max`: it already knows this image.
==================  ===========  ==============================================================

The rows above are the priority order: a candidate's `reason` is the first enabled filter it fails
(safety first, then quality, then redundancy); `failed` lists them all. The critic is a model
trained on real training data only and frozen (by default round 0's), never the model being
improved this round; the loop passes its probabilities and embeddings in. Pixel similarity is
defined in `vision_si.similarity`.

Choosing the thresholds. By default fidelity, memorisation and leakage are calibrated on the real
data (`fidelity_percentile` 10, `memorisation_percentile` 99, `leak_percentile` 99): with the fixed
values below, the efficacy benchmark's ELPV runs rejected all 600 candidates, because a weak round-0
critic gives the true class ≥ 0.5 to only 3–5 % of real val images and real ELPV cells are that
close to each other (benchmarks/results/efficacy_quick.md). Set a percentile to null for the fixed
value. The fixed near-copy values (cosine 0.98, pixel correlation 0.95 at 16 px)
call "near-copy" what differs from a real image by noise carrying at most ~10 % of its variance.
Some data sets hold real images that close to each other: at 16 px, 16 % of 800 ELPV cells have
another cell correlating ≥ 0.95 (3 % ≥ 0.98), and half of the 8×8 digits do. There, set
`memorisation_percentile` (e.g. 99: a candidate is memorised when it is closer to a training image
than 99 % of real training images are to their nearest other one) or raise the pixel thresholds;
`filter.json` reports both distributions (`closest_real`) so the choice can be checked.

`reviews` (id → accept|reject, from the run's `reviews.csv`) override decisions: a rejected
candidate a human accepts is accepted (its reason kept, `overridden` true), an accepted one a
human rejects is rejected with reason `human_review`; a `leak` is never overridden.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from sklearn.exceptions import NotFittedError
from sklearn.neighbors import LocalOutlierFactor, NearestNeighbors

from vision_si.classifier import TrainedClassifier, predict
from vision_si.config import FilterConfig
from vision_si.errors import DataError, InputError, RunDirError
from vision_si.similarity import (
    check_images,
    greedy_unique,
    max_similarity,
    near_copy_pairs,
    pixel_vectors,
    unit_rows,
)

PRIORITY = ("leakage", "memorisation", "fidelity", "realism", "duplicate", "informativeness")
REASONS = {"leakage": "leak", "memorisation": "memorised", "fidelity": "off_class", "realism": "unrealistic",
           "duplicate": "duplicate", "informativeness": "too_easy"}
HUMAN_REJECT = "human_review"
QUANTILES = {"min": 0, "p01": 1, "p05": 5, "p25": 25, "p50": 50, "p75": 75, "p95": 95, "max": 100}
BASELINE_SAMPLES = 2000  # real train images whose nearest other real image sets the privacy baseline


# --------------------------------------------------------------------------- inputs


@dataclass
class Candidates:
    """What the filters see of the candidates; embeddings and pixels already as unit vectors."""

    ids: list[str]
    labels: np.ndarray
    critic_probs: np.ndarray
    critic_emb: np.ndarray
    current_probs: np.ndarray
    pixels: np.ndarray
    sha256: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class RealReference:
    """Real data the filters fit on. Train for memorisation/realism, eval (val+test) for leakage only."""

    train_labels: np.ndarray
    train_emb: np.ndarray
    train_pixels: np.ndarray
    eval_emb: np.ndarray
    eval_pixels: np.ndarray
    eval_sha256: list[str] | None = None
    pool_emb: np.ndarray | None = None
    pool_pixels: np.ndarray | None = None
    val_critic_probs: np.ndarray | None = None
    val_labels: np.ndarray | None = None
    seed: int = 0

    @functools.cached_property
    def train_self_similarity(self) -> tuple[np.ndarray, np.ndarray]:
        """Cosine and pixel similarity of (a seeded sample of) real train images to their nearest other one."""
        n = len(self.train_labels)
        rows = np.arange(n)
        if n > BASELINE_SAMPLES:
            rows = np.sort(np.random.default_rng(self.seed).choice(n, BASELINE_SAMPLES, replace=False))
        cos, _ = max_similarity(self.train_emb[rows], self.train_emb, exclude=rows)
        pix, _ = max_similarity(self.train_pixels[rows], self.train_pixels, exclude=rows)
        return cos, pix


# --------------------------------------------------------------------------- registry

FILTERS: dict[str, type[CandidateFilter]] = {}


def register_filter(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        if name in FILTERS:
            raise ValueError(f"filter '{name}' is already registered")
        cls.name = name
        FILTERS[name] = cls
        return cls

    return add


def create_filter(name: str, cfg: FilterConfig) -> CandidateFilter:
    if name not in FILTERS:
        raise InputError(f"unknown filter '{name}'; registered: {', '.join(sorted(FILTERS))}")
    return FILTERS[name].from_config(cfg)


class CandidateFilter:
    """Base of the filters: the scikit-learn shape, plus the score columns it writes."""

    name: ClassVar[str] = ""
    columns: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_config(cls, cfg: FilterConfig) -> CandidateFilter:
        raise NotImplementedError

    def fit(self, real: RealReference) -> CandidateFilter:
        raise NotImplementedError

    def score(self, cands: Candidates) -> np.ndarray:
        raise NotImplementedError

    def accept(self, scores: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _check_fitted(self) -> None:
        if not any(k.endswith("_") and not k.startswith("_") for k in vars(self)):
            raise NotFittedError(f"the {self.name} filter is not fitted yet: call fit(real) before score/accept")

    def thresholds(self) -> dict[str, Any]:
        """Parameters and the learned scalar thresholds, for the record."""
        self._check_fitted()
        return {k: v for k, v in vars(self).items() if v is None or np.isscalar(v)}


def _true_class(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return probs[np.arange(len(labels)), labels].astype(np.float64)


def _at_least(values: np.ndarray, threshold: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(values, nan=-np.inf) >= threshold


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


# --------------------------------------------------------------------------- the result


def _column_kind(name: str) -> str:
    if name in ("id", "failed", "decision", "reason"):
        return "str"
    if name == "overridden":
        return "bool"
    if name == "class" or name.endswith("_index") or name == "leak_sha256":
        return "int"
    return "float"


@dataclass
class FilterResult:
    """The per-candidate table and its summary; `save` writes `scores.csv` and `filter.json`."""

    rows: list[dict[str, Any]]
    accepted_ids: list[str]
    counts: dict[str, int]  # rejected candidates per reason (every reason listed)
    thresholds: dict[str, dict[str, Any]]  # per filter, the thresholds actually used
    enabled: list[str]  # filters that took part in the decision (leakage always)
    overridden_ids: list[str] = field(default_factory=list)
    review_refused_ids: list[str] = field(default_factory=list)  # human 'accept' on a leak: refused
    closest_real: dict[str, Any] = field(default_factory=dict)
    priority: list[str] = field(default_factory=lambda: [REASONS[n] for n in PRIORITY])
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return list(self.rows[0]) if self.rows else ["id", "class", "decision", "reason", "failed", "overridden"]

    def column(self, name: str) -> np.ndarray:
        return np.asarray([r[name] for r in self.rows])

    def rejected_counts(self) -> dict[str, int]:
        return dict(self.counts)

    def reason_of(self, candidate_id: str) -> str:
        for r in self.rows:
            if r["id"] == candidate_id:
                return r["reason"]
        raise KeyError(candidate_id)

    def save(self, out_dir: str | Path) -> None:
        from vision_si.rundir import atomic_write_json, atomic_write_text

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cols = self.columns
        lines = [",".join(cols)]
        for r in self.rows:
            lines.append(",".join(_csv_cell(r[c]) for c in cols))
        atomic_write_text(out / "scores.csv", "\n".join(lines) + "\n")
        meta = {k: v for k, v in self.__dict__.items() if k != "rows"}
        meta["n_candidates"] = len(self.rows)
        meta["columns"] = {c: _column_kind(c) for c in cols}
        atomic_write_json(out / "filter.json", meta)

    @classmethod
    def load(cls, out_dir: str | Path) -> FilterResult:
        from vision_si.rundir import read_json

        out = Path(out_dir)
        meta = read_json(out / "filter.json")
        kinds = meta.pop("columns")
        meta.pop("n_candidates", None)
        path = out / "scores.csv"
        if not path.is_file():
            raise RunDirError(f"'{path}' is missing")
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [{k: _parse_cell(v, kinds.get(k, "str")) for k, v in row.items()} for row in csv.DictReader(fh)]
        return cls(rows=rows, **meta)


def _csv_cell(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (float, np.floating)):
        return "" if np.isnan(v) else repr(float(v))
    text = str(v)
    return f'"{text}"' if any(ch in text for ch in ',"\n') else text


def _parse_cell(v: str, kind: str) -> Any:
    if kind == "float":
        return float(v) if v != "" else float("nan")
    if kind == "int":
        return int(v)
    if kind == "bool":
        return v == "true"
    return v


# --------------------------------------------------------------------------- reviews


def read_reviews(path: str | Path) -> dict[str, str] | None:
    """`reviews.csv` with columns id, verdict (accept|reject); None when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    out: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for n, row in enumerate(csv.DictReader(text.splitlines()), start=2):
        verdict = (row.get("verdict") or "").strip().lower()
        if not (row.get("id") or "").strip() or verdict not in ("accept", "reject"):
            raise DataError(f"{path}: line {n} needs an id and a verdict of 'accept' or 'reject', got {row}")
        out[row["id"].strip()] = verdict
    return out


def _apply_reviews(rows: list[dict[str, Any]], reviews: Mapping[str, str]) -> tuple[list[str], list[str]]:
    for key, verdict in reviews.items():
        if verdict not in ("accept", "reject"):
            raise DataError(f"reviews: verdict for '{key}' is {verdict!r}; allowed: accept, reject")
    overridden, refused = [], []
    for r in rows:
        verdict = reviews.get(r["id"])
        if verdict is None:
            continue
        if verdict == "accept" and r["decision"] == "rejected":
            if r["reason"] == REASONS["leakage"]:
                refused.append(r["id"])  # an evaluation image in training would void every later measurement
                continue
            r["decision"], r["overridden"] = "accepted", True
            overridden.append(r["id"])
        elif verdict == "reject" and r["decision"] == "accepted":
            r["decision"], r["reason"], r["overridden"] = "rejected", HUMAN_REJECT, True
            overridden.append(r["id"])
    return overridden, refused


# --------------------------------------------------------------------------- the public function


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
