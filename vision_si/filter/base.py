"""What every filter shares: the inputs (`Candidates`, `RealReference`), the base class, the registry.

A filter has the scikit-learn shape: parameters in `__init__`, `fit(real)` learns from real data only
and returns self, learned state ends in `_`, `score(candidates)` gives an N × len(columns) array,
`accept(scores)` a boolean mask. `register_filter(name)` adds a class to `FILTERS`; `PRIORITY` is the
order in which a candidate's first failing filter becomes its `reason`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from sklearn.exceptions import NotFittedError

from vision_si.config import FILTER_PRIORITY, FilterConfig
from vision_si.errors import InputError
from vision_si.similarity import max_similarity

PRIORITY = FILTER_PRIORITY  # one list, kept in vision_si.config so that config validation can read it
REASONS = {"leakage": "leak", "memorisation": "memorised", "fidelity": "off_class", "realism": "unrealistic",
           "duplicate": "duplicate", "informativeness": "too_easy"}
HUMAN_REJECT = "human_review"
BASELINE_SAMPLES = 2000  # real train images whose nearest other real image sets the privacy baseline


@dataclass(frozen=True)
class ModelOutputs:
    """What the models say of each image set, row for row: `filter_candidates`' model inputs as plain arrays.

    The frozen critic (trained on real data only, never the model being improved) gives probabilities
    of the candidates and embeddings of every set; the current model gives its probabilities of the
    candidates (informativeness). `val_probs`: the critic on real val (the first rows of the
    evaluation set), needed only for `fidelity_percentile`.
    """

    candidate_probs: np.ndarray
    candidate_emb: np.ndarray
    current_probs: np.ndarray
    train_emb: np.ndarray
    eval_emb: np.ndarray
    pool_emb: np.ndarray | None = None
    val_probs: np.ndarray | None = None


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
