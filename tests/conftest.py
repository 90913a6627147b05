"""Shared fixtures: small image datasets written with PIL into a temporary folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image(path: Path, seed: int, size: int = 12, mode: str = "L", fmt: str | None = None) -> Path:
    """A random image (distinct bytes per seed) saved at `path`, creating folders as needed."""
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode).save(path, format=fmt)
    return path


@pytest.fixture
def image_folder(tmp_path):
    """`make(counts, size)` builds root/<class>/<i>.png with counts[class] images; returns the root."""
    seeds = iter(range(10_000))

    def make(counts: dict[str, int], size: int = 12, root: Path | None = None) -> Path:
        root = root or tmp_path / "folder"
        for cls, n in counts.items():
            for i in range(n):
                write_image(root / cls / f"{i:03d}.png", next(seeds), size)
        return root

    return make
