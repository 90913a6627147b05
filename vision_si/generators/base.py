"""The generator plug-in surface: requests, manifest rows, the `Generator` protocol and its registry.

A backend registers itself with `@register_generator("name")`; `create_generator(name, **cfg)`
builds one from a preset's keys (every key but `backend`, see `presets.generator_kwargs`); a key the
backend does not take is refused with the list of keys it does take. Images travel as float32
arrays N×C×H×W in [0, 1] (grayscale stays one channel); `to_data_batch` turns a backend's output
batch into that form at the data's channels and size.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
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
    backend: str = "ddpm"
    classifier_scale: float | None = None  # guided mode only
    batch_id: str | None = None  # first id of the chunk the image was computed in (see generators.runner)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ManifestRow:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"manifest row has unknown keys {sorted(unknown)}")
        return cls(**data)


def match_data(x: Any, channels: int, size: tuple[int, int], *, resample: str = "bilinear",
               gray_weights: Sequence[float] | None = None) -> Any:
    """A torch batch N×C×H×W → the data's `channels` (1 or 3) and `size` (H, W), in differentiable torch ops.

    Three channels become one by `gray_weights` (default: their mean), one becomes three by repetition.
    Channels are reduced before resizing and repeated after, so the resize works on as few as it can.
    """
    import torch.nn.functional as F

    if x.shape[1] > channels:
        x = (x.mean(dim=1, keepdim=True) if gray_weights is None
             else (x * x.new_tensor(gray_weights).view(1, -1, 1, 1)).sum(dim=1, keepdim=True))
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode=resample, antialias=True, align_corners=False)
    if x.shape[1] < channels:
        x = x.expand(-1, channels, -1, -1)
    return x


def to_data_batch(x: Any, channels: int, size: tuple[int, int], **kwargs: Any) -> np.ndarray:
    """A backend's output batch (torch N×C×H×W) as images travel between stages: float32 numpy N×C×H×W in [0, 1].

    `channels`, `size` and `kwargs` as in `match_data`.
    """
    return match_data(x, channels, size, **kwargs).clamp(0, 1).detach().cpu().numpy().astype(np.float32)


def image_seed(run_seed: int, image_id: str) -> int:
    """Per-image seed from the run seed and the image id, so a resumed job repeats each image."""
    digest = hashlib.sha256(f"{run_seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def merge_preset_section(section: str, given: Any, defaults: dict[str, Any], preset: str) -> dict[str, Any]:
    """A preset section with its defaults filled in; a non-mapping or an unknown key names the preset and key."""
    given = {} if given is None else given
    if not isinstance(given, dict):
        raise ConfigError(f"generator preset {preset!r}: '{section}' must be a mapping, got {given!r}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"generator preset {preset!r}: unknown key(s) {unknown} in '{section}'; "
                          f"allowed: {', '.join(defaults)}")
    return {**defaults, **given}


def preset_check(ok: bool, preset: str, key: str, value: Any, allowed: str) -> None:
    """Refuse a preset value out of range, naming the preset, the key, the value and what is allowed."""
    if not ok:
        raise ConfigError(f"generator preset {preset!r}: {key}={value!r} is out of range ({allowed})")


class PipelineGenerator:
    """What every diffusers-pipeline backend shares: sampling settings read from `settings()["sample"]`
    and the fitted pipeline (`pipeline_`) with the sha256 of its weights (`checkpoint_sha256_`)."""

    def settings(self) -> dict[str, Any]:  # pragma: no cover - every backend defines it
        raise NotImplementedError

    @property
    def steps(self) -> int:
        return int(self.settings()["sample"]["steps"])

    @property
    def guidance_scale(self) -> float:
        return float(self.settings()["sample"]["guidance_scale"])

    @property
    def checkpoint_sha256(self) -> str:
        self._check_fitted()
        return self.checkpoint_sha256_

    def _check_fitted(self) -> None:
        if not hasattr(self, "pipeline_"):
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet; call fit(images, labels, classes, "
                               "seed=...)")


@runtime_checkable
class Generator(Protocol):
    """What every backend offers. `fit` may only load weights for pretrained backends.

    - `fit(images N×C×H×W, labels, classes, seed=..., cache_dir=..., progress=...)` returns self.
    - `generate_batch` makes one image per entry of `class_indices`, image k drawn from its own
      `torch.Generator` seeded with `seeds[k]` (so it does not depend on its batch neighbours), and
      returns N×C×H×W float32 in [0, 1] at the training images' size and channel count. `exemplars`
      (N×C×H×W, exemplar mode) are noised to `strength` and denoised; `classifier_fn` (N×C×H×W in
      [0, 1] → logits, differentiable) steers the guided mode with weight `classifier_scale`;
      `steps` and `guidance_scale` default to the backend's preset.
    - `steps`, `guidance_scale`: the preset's defaults, recorded in the manifest.
    - `checkpoint_sha256`: identifies the weights, recorded in the manifest.
    """

    def fit(self, images: np.ndarray, labels: np.ndarray, classes: list[str], *, seed: int,
            cache_dir: Path | None = None, progress: bool = True) -> Generator: ...

    def generate_batch(self, class_indices: np.ndarray, seeds: list[int], *, mode: str,
                       exemplars: np.ndarray | None = None, strength: float = 0.5,
                       classifier_fn: Callable[..., Any] | None = None, classifier_scale: float = 0.0,
                       steps: int | None = None, guidance_scale: float | None = None) -> np.ndarray: ...

    @property
    def steps(self) -> int: ...

    @property
    def guidance_scale(self) -> float | None: ...

    @property
    def checkpoint_sha256(self) -> str: ...


_REGISTRY: dict[str, Callable[..., Generator]] = {}
_NOT_BACKENDS = {"base", "pipeline", "presets", "runner"}
_UNAVAILABLE: dict[str, str] = {}  # backend module → why it could not be imported (a missing extra)


def _import_backends() -> None:
    """Import every backend module of this package once, so their decorators fill the registry.

    A module whose optional dependency is missing (an extra not installed) is noted, not fatal.
    """
    package = importlib.import_module("vision_si.generators")
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in _NOT_BACKENDS or info.name.startswith("_") or info.name in _UNAVAILABLE:
            continue
        try:
            importlib.import_module(f"vision_si.generators.{info.name}")
        except ModuleNotFoundError as exc:
            if (exc.name or "").startswith("vision_si"):
                raise
            _UNAVAILABLE[info.name] = f"needs {exc.name}"


def register_generator(name: str) -> Callable[[Callable[..., Generator]], Callable[..., Generator]]:
    def wrap(factory: Callable[..., Generator]) -> Callable[..., Generator]:
        if name in _REGISTRY:
            raise ValueError(f"generator {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return wrap


def list_generators() -> list[str]:
    _import_backends()
    return sorted(_REGISTRY)


def create_generator(name: str, /, **cfg: Any) -> Generator:
    """Build the backend `name` from preset keys; unknown names and keys raise `ConfigError`."""
    _import_backends()
    if name not in _REGISTRY:
        missing = "".join(f"; {m} unavailable ({why})" for m, why in sorted(_UNAVAILABLE.items()))
        raise ConfigError(f"unknown generator {name!r}; known: {', '.join(list_generators()) or 'none'}{missing}")
    factory = _REGISTRY[name]
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(cfg) - set(params))
        if unknown:
            raise ConfigError(f"generator {name!r} does not take {unknown}; allowed keys: {', '.join(params)}")
    return factory(**cfg)
