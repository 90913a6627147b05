"""Images as they travel between stages: one checker, and `LabelledImages`, the bundle of a split.

`check_images` is the one place image arrays are validated (the classifier, the generators and the
similarity search call it): float N×C×H×W, finite, and by default in [0, 1]; optional labels must be
one integer class index per image. `LabelledImages` holds what every stage needs of a set of
images (pixels, labels, ids, sha256) so that a split, a round's candidates or the synthetic pool
travel as one argument instead of four.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vision_si.errors import DataError


def check_images(images: Any, name: str, *, labels: Any = None, num_classes: int | None = None,
                 shape: tuple[int, ...] | None = None, unit_range: bool = True,
                 nonempty: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """`images` as float32 N×C×H×W (and `labels` as int64), or a `DataError` naming `name` and the problem.

    `shape`: the required C×H×W; `unit_range`: values must lie in [0, 1] (else only finite);
    `nonempty`: at least one image; `num_classes`: labels must lie in 0..num_classes-1.
    """
    kinds = (np.floating,) if unit_range else (np.floating, np.integer)
    if not isinstance(images, np.ndarray) or images.ndim != 4 or not any(
            np.issubdtype(images.dtype, k) for k in kinds):
        raise DataError(f"{name}: expected a {'float ' if unit_range else ''}N×C×H×W array, got "
                        f"{type(images).__name__} {getattr(images, 'shape', '')} {getattr(images, 'dtype', '')}")
    x = np.asarray(images, dtype=np.float32)
    if shape is not None and x.shape[1:] != tuple(shape):
        raise DataError(f"{name}: images are {x.shape[1:]} (C, H, W), expected {tuple(shape)}")
    if nonempty and len(x) == 0:
        raise DataError(f"{name}: no images")
    if x.size and not np.isfinite(x).all():
        raise DataError(f"{name}: images contain NaN or infinite values")
    if unit_range and x.size and (x.min() < 0 or x.max() > 1):
        raise DataError(f"{name}: pixel values must lie in [0, 1], found {x.min():.3g} to {x.max():.3g}")
    if labels is None:
        return x, None
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != len(x) or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"{name}: {len(x)} images need as many integer labels, got shape {y.shape} of {y.dtype}")
    if num_classes is not None and y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{name}: labels must be class indices 0..{num_classes - 1}, found {y.min()}..{y.max()}")
    return x, y.astype(np.int64)


@dataclass(frozen=True)
class LabelledImages:
    """N images with their labels, ids and content hashes (the sha256 of each image's file bytes).

    `images` are float32 N×C×H×W in [0, 1]; `labels` int64 class indices. Checked on creation.
    """

    images: np.ndarray
    labels: np.ndarray
    ids: list[str]
    sha256: list[str]

    def __post_init__(self) -> None:
        images, labels = check_images(self.images, "images", labels=self.labels)
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "ids", [str(i) for i in self.ids])
        object.__setattr__(self, "sha256", [str(h) for h in self.sha256])
        if len(self.ids) != len(images) or len(self.sha256) != len(images):
            raise DataError(f"{len(images)} images need as many ids and sha256, got {len(self.ids)} and "
                            f"{len(self.sha256)}")

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx: Sequence[int] | np.ndarray) -> LabelledImages:
        """Rows `idx` (indices, or a boolean mask), in that order."""
        idx = np.asarray(idx)
        rows = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64).reshape(-1)
        return LabelledImages(self.images[rows], self.labels[rows], [self.ids[i] for i in rows],
                              [self.sha256[i] for i in rows])

    @classmethod
    def of_labels(cls, labels: Sequence[int] | np.ndarray, ids: Sequence[str],
                  sha256: Sequence[str] | None = None) -> LabelledImages:
        """Labels and ids without pixels (images N×0×0×0), for a caller that has only a model's outputs on
        the images, such as the diagnosis of precomputed embeddings."""
        labels = np.asarray(labels)
        return cls(np.zeros((len(labels), 0, 0, 0), np.float32), labels, list(ids),
                   list(sha256) if sha256 is not None else [""] * len(labels))

    @classmethod
    def empty(cls, channels: int, size: int) -> LabelledImages:
        return cls(np.zeros((0, channels, size, size), np.float32), np.zeros(0, np.int64), [], [])

    @classmethod
    def concat(cls, parts: Sequence[LabelledImages]) -> LabelledImages:
        """The rows of every part, in order (at least one part)."""
        return cls(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
                   [i for p in parts for i in p.ids], [h for p in parts for h in p.sha256])
