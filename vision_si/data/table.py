"""The sample table every source returns.

One row per real image: a stable id, the integer label and its class name, an optional group
(patient, module, site), free metadata, the sha256 of the image's bytes, and where its pixels come
from. Pixels are read through `load(i)`, which returns the decoded image as float32 H×W×C in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class SampleTable:
    ids: list[str]
    labels: np.ndarray  # int64, index into `classes`
    classes: list[str]
    sources: list[str]  # file path, or "<source>:<index>" for array-backed sources
    sha256: list[str]
    groups: list[str | None]
    metadata: list[dict[str, Any]]
    loader: Callable[[int], np.ndarray] = field(repr=False)
    name: str = "dataset"
    source_splits: list[str | None] | None = None  # a split shipped with the data (MedMNIST)

    def __post_init__(self) -> None:
        n = len(self.ids)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        for key in ("labels", "sources", "sha256", "groups", "metadata"):
            if len(getattr(self, key)) != n:
                raise ValueError(f"sample table column '{key}' has {len(getattr(self, key))} rows, ids have {n}")
        if len(set(self.ids)) != n:
            raise ValueError("sample ids must be unique")

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int) -> np.ndarray:
        return self.loader(i)

    @property
    def has_groups(self) -> bool:
        return any(g is not None for g in self.groups)
