"""The timm model: create it, its input normalisation, the device, and the image checks of this package.

`create_classifier` builds any timm architecture by name; weights from scratch (`pretrained: none`),
a local file through timm's own `pretrained_cfg_overlay=dict(file=...)`, or the hub (`hub`, online
only). A local ImageNet file is adapted by timm: first conv to `in_chans`, head dropped when the
class count differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from timm.data import resolve_model_data_config

from vision_si.config import ClassifierConfig
from vision_si.errors import ConfigError, DataError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA when present, else CPU; otherwise the named device, which must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"classifier.device: {name!r} is not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"classifier.device: {name!r} requested but CUDA is not available; use auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"classifier.device: {name!r} requested but MPS is not available; use auto or cpu")
    return device


def _build(arch: str, kwargs: dict[str, Any], image_size: int, **weights: Any) -> tuple[torch.nn.Module, dict]:
    """`timm.create_model`, passing `img_size` only to architectures that take it (ViTs and kin)."""
    kwargs = dict(kwargs)
    if "img_size" not in kwargs:
        try:
            return timm.create_model(arch, img_size=image_size, **kwargs, **weights), {**kwargs, "img_size": image_size}
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise ConfigError(f"classifier.model_kwargs: {arch} refused {kwargs}: {exc}") from None
    try:
        return timm.create_model(arch, **kwargs, **weights), kwargs
    except TypeError as exc:
        raise ConfigError(f"classifier.model_kwargs: {arch} refused {kwargs}: {exc}") from None


def _creation(cfg: ClassifierConfig, num_classes: int, in_chans: int, image_size: int) -> tuple[torch.nn.Module, dict]:
    if not timm.is_model(cfg.arch):
        import difflib

        close = difflib.get_close_matches(cfg.arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ConfigError(f"classifier.arch: {cfg.arch!r} is not a timm model{hint}")
    base = {"num_classes": num_classes, "in_chans": in_chans, **cfg.model_kwargs}
    if cfg.pretrained == "none":
        weights: dict[str, Any] = {"pretrained": False}
    elif cfg.pretrained == "hub":
        weights = {"pretrained": True}
    else:
        path = Path(cfg.pretrained).expanduser()
        if not path.is_file():
            raise ConfigError(f"classifier.pretrained: weights file '{cfg.pretrained}' not found "
                              "(allowed: none, hub, or the path of a local weights file)")
        # timm reads .safetensors without pickle and other files with torch.load(weights_only=True)
        weights = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path.resolve())}}
    try:
        return _build(cfg.arch, base, image_size, **weights)
    except (ConfigError, FileNotFoundError):
        raise
    except Exception as exc:  # e.g. a pickle that torch.load(weights_only=True) refuses, or mismatched shapes
        if cfg.pretrained in ("none", "hub"):
            raise
        raise ConfigError(f"classifier.pretrained: cannot load weights from '{cfg.pretrained}' into "
                          f"{cfg.arch}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def create_classifier(cfg: ClassifierConfig, num_classes: int, in_chans: int, image_size: int) -> torch.nn.Module:
    """The timm model `cfg.arch` with `num_classes` outputs and `in_chans` inputs, weights per `cfg.pretrained`."""
    return _creation(cfg, num_classes, in_chans, image_size)[0]


def normalisation(model: torch.nn.Module, in_chans: int) -> tuple[list[float], list[float]]:
    """Mean and std from `timm.data.resolve_model_data_config`, averaged when the channel counts differ."""
    data_cfg = resolve_model_data_config(model)
    mean, std = [float(m) for m in data_cfg["mean"]], [float(s) for s in data_cfg["std"]]
    if len(mean) != in_chans:  # e.g. RGB ImageNet statistics for a grayscale model
        mean, std = [float(np.mean(mean))] * in_chans, [float(np.mean(std))] * in_chans
    return mean, std


def _norm_tensors(meta: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(meta["mean"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return mean, std


def _check_images(name: str, images: Any, labels: Any | None = None, num_classes: int | None = None,
                  shape: tuple | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    if not isinstance(images, np.ndarray) or images.ndim != 4 or not np.issubdtype(images.dtype, np.floating):
        raise DataError(f"{name}: expected a float N×C×H×W array, got "
                        f"{type(images).__name__} {getattr(images, 'shape', '')} {getattr(images, 'dtype', '')}")
    images = np.asarray(images, dtype=np.float32)
    if shape is not None and images.shape[1:] != shape:
        raise DataError(f"{name}: images are {images.shape[1:]} (C, H, W), expected {shape}")
    if images.size and (images.min() < 0 or images.max() > 1 or not np.isfinite(images).all()):
        raise DataError(f"{name}: pixel values must lie in [0, 1], found {images.min():.3g} to {images.max():.3g}")
    if labels is None:
        return images, None
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images) or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"{name}: {len(images)} images need as many integer labels, got shape {labels.shape} "
                        f"of {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{name}: labels must be class indices 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    return images, labels.astype(np.int64)
