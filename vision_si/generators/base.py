"""The generator plug-in surface: requests, manifest rows, the `Generator` protocol and its registry.

A backend registers itself with `@register_generator("name")`; `create_generator(name, **cfg)`
builds one. Images travel as float32 arrays C×H×W in [0, 1] (grayscale stays one channel).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from vision_si.errors import ConfigError

MODES = ("class", "exemplar", "guided")


@dataclass
class GenerationRequest:
    """One allocation of the diagnosis budget: make `count` images of `class_index` for `slice_id`."""

    class_index: int
    class_name: str
    slice_id: str
    count: int
    exemplar_ids: list[str] = field(default_factory=list)
    mode: str = "exemplar"
    strength: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"request mode {self.mode!r} is not one of {list(MODES)}")
        if self.count < 0:
            raise ConfigError(f"request count {self.count} for class {self.class_name!r} must be >= 0")
        if not 0.0 <= self.strength <= 1.0:
            raise ConfigError(f"request strength {self.strength} for class {self.class_name!r} must be in [0, 1]")
        if self.mode == "exemplar" and self.count > 0 and not self.exemplar_ids:
            raise ConfigError(f"exemplar-mode request for class {self.class_name!r} has no exemplar_ids")


@dataclass
class ManifestRow:
    """One generated image; enough to regenerate it exactly (DESIGN.md section 3)."""

    id: str
    path: str  # relative to the generation folder
    sha256: str
    class_index: int
    class_name: str
    slice: str
    mode: str
    preset: str
    generator_sha256: str
    seed: int
    exemplar_ids: list[str]
    strength: float | None
    steps: int
    guidance: float | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def image_seed(run_seed: int, image_id: str) -> int:
    """Per-image seed from the run seed and the image id, so a resumed job repeats each image."""
    digest = hashlib.sha256(f"{run_seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@runtime_checkable
class Generator(Protocol):
    """What every backend offers. `fit` may be a no-op for pretrained backends."""

    def fit(self, images: np.ndarray, labels: np.ndarray, classes: list[str], *, seed: int,
            cache_dir: Path | None = None, progress: bool = True) -> Generator: ...

    def generate_batch(self, class_indices: np.ndarray, seeds: list[int], *, mode: str,
                       exemplars: np.ndarray | None = None, strength: float = 0.5,
                       classifier: Any = None) -> np.ndarray: ...

    @property
    def checkpoint_sha256(self) -> str: ...


_REGISTRY: dict[str, Callable[..., Generator]] = {}


def register_generator(name: str) -> Callable[[Callable[..., Generator]], Callable[..., Generator]]:
    def wrap(factory: Callable[..., Generator]) -> Callable[..., Generator]:
        if name in _REGISTRY:
            raise ValueError(f"generator {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return wrap


def list_generators() -> list[str]:
    return sorted(_REGISTRY)


def create_generator(name: str, **cfg: Any) -> Generator:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown generator {name!r}; known: {', '.join(list_generators()) or 'none'}")
    return _REGISTRY[name](**cfg)
