"""The sample table every source returns.

One row per real image: a stable id, the integer label and its class name, an optional group
(patient, module, site), free metadata, the sha256 of the image's bytes, and where its pixels come
from. Pixels are read through `load(i)`, which returns the decoded image as float32 H×W×C in [0, 1]
with the image's own channel count (1 for grayscale, 3 for colour).

`skipped` records the images a source dropped under `on_bad_image: skip` (one dict per file with
`path` and `reason`); the loop writes it to the run's records, so a skip is never silent.
Loaders are picklable callables, so a table can travel to DataLoader worker processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SubsetLoader:
    """Row `j` of a subset is row `indices[j]` of its parent (a class, not a lambda, so it pickles
    into DataLoader worker processes)."""

    parent: Callable[[int], np.ndarray]
    indices: list[int]

    def __call__(self, j: int) -> np.ndarray:
        return self.parent(self.indices[j])


@dataclass
class SampleTable:
    ids: list[str]
    labels: np.ndarray  # int64, index into `classes`
    classes: list[str]
    sources: list[str]  # file path, or "<file>#<split>/<index>" for array-backed sources
    sha256: list[str]
    groups: list[str | None]
    metadata: list[dict[str, Any]]
    loader: Callable[[int], np.ndarray] = field(repr=False)
    name: str = "dataset"
    source_splits: list[str | None] | None = None  # a split shipped with the data (MedMNIST)
    channels: int | None = None  # the data's own channel count (3 if any image is colour, else 1)
    skipped: list[dict[str, str]] = field(default_factory=list)  # images dropped by on_bad_image: skip
    in_memory: bool = False  # pixels already held in memory (digits, medmnist): no disk cache needed

    def __post_init__(self) -> None:
        n = len(self.ids)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        for key in ("labels", "sources", "sha256", "groups", "metadata"):
            if len(getattr(self, key)) != n:
                raise ValueError(f"sample table column '{key}' has {len(getattr(self, key))} rows, ids have {n}")
        if self.source_splits is not None and len(self.source_splits) != n:
            raise ValueError(f"sample table column 'source_splits' has {len(self.source_splits)} rows, ids have {n}")
        if len(set(self.ids)) != n:
            raise ValueError("sample ids must be unique")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"labels must lie in 0..{len(self.classes) - 1}")

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int) -> np.ndarray:
        return self.loader(int(i))

    @property
    def has_groups(self) -> bool:
        return any(g is not None for g in self.groups)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.classes))

    def subset(self, indices: Sequence[int] | np.ndarray) -> SampleTable:
        """Rows `indices` (in that order) as a new table; classes are kept even if one empties."""
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64)]
        return SampleTable(
            ids=[self.ids[i] for i in idx],
            labels=self.labels[idx] if idx else np.zeros(0, dtype=np.int64),
            classes=list(self.classes),
            sources=[self.sources[i] for i in idx],
            sha256=[self.sha256[i] for i in idx],
            groups=[self.groups[i] for i in idx],
            metadata=[self.metadata[i] for i in idx],
            loader=SubsetLoader(self.loader, idx),
            name=self.name,
            source_splits=None if self.source_splits is None else [self.source_splits[i] for i in idx],
            channels=self.channels,
            skipped=list(self.skipped),
            in_memory=self.in_memory,
        )
