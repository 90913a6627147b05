"""The timm model: create it and its input normalisation (the device and image checks come from
`vision_si.devices` and `vision_si.data.arrays`, re-exported here for the classifier's modules).

`create_classifier` builds any timm architecture by name; weights from scratch (`pretrained: none`),
a local file through timm's own `pretrained_cfg_overlay=dict(file=...)`, or the hub (`hub`, online
only). A local ImageNet file is adapted by timm: first conv to `in_chans`, head dropped when the
class count differs.

A self-supervised encoder's `model.safetensors` (vision_si/pretrain.py; its header's metadata says
`ENCODER_FORMAT`) is loaded here instead of by timm: same architecture and `in_chans` required, the
backbone with `strict=False` for the head only, and every backbone weight must be in the file
(timm's loader would silently drop what does not match once the class count differs). The loop
resolves `pretrained: ssl` to that file before training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import timm
import torch
from timm.data import resolve_model_data_config

from vision_si.config import ClassifierConfig
from vision_si.data.arrays import check_images
from vision_si.devices import resolve_device  # noqa: F401 - re-exported: vision_si.classifier.resolve_device
from vision_si.errors import ConfigError

ENCODER_FORMAT = "vision_si.encoder/1"  # `format` in the safetensors metadata of a pretrained encoder


def encoder_file_metadata(arch: str, in_chans: int) -> dict[str, str]:
    """The safetensors metadata that marks an encoder's weights file: one key holding sorted JSON, because
    safetensors writes several keys in an order that varies between calls (the file's sha256 would too)."""
    return {"vision_si": json.dumps({"format": ENCODER_FORMAT, "arch": arch, "in_chans": int(in_chans)}, sort_keys=True)}


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
    if cfg.pretrained == "ssl":
        raise ConfigError("classifier.pretrained: 'ssl' is this run's pretrained encoder, which the loop resolves "
                          "(pretrain.enabled: true); outside a run give the encoder's model.safetensors path")
    encoder = _encoder_metadata(cfg.pretrained) if cfg.pretrained not in ("none", "hub") else None
    if encoder is not None:
        model, kwargs = _build(cfg.arch, base, image_size, pretrained=False)
        _load_backbone(model, Path(cfg.pretrained).expanduser(), encoder, cfg.arch, in_chans)
        return model, kwargs
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


def _encoder_metadata(pretrained: str) -> dict[str, Any] | None:
    """The safetensors metadata of a vision_si encoder file, or None for any other file (or none)."""
    path = Path(pretrained).expanduser()
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safetensors.safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("vision_si", "{}"))
    except Exception:  # not a safetensors file (timm's loader reports it), or not ours
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == ENCODER_FORMAT else None


def _load_backbone(model: torch.nn.Module, path: Path, meta: dict[str, Any], arch: str, in_chans: int) -> None:
    """Encoder weights into a fresh classifier: everything but the head, which must be all that is missing."""
    where = f"classifier.pretrained: encoder '{path}'"
    if meta.get("arch") != arch:
        raise ConfigError(f"{where} is a {meta.get('arch')!r}, the classifier a {arch!r}; pretrain with classifier.arch")
    if str(meta.get("in_chans")) != str(in_chans):
        raise ConfigError(f"{where} takes {meta.get('in_chans')} channel(s), the data has {in_chans}")
    state = safetensors.torch.load_file(str(path))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ: other model_kwargs, or a ViT at another image size
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise ConfigError(f"{where} does not fit {arch} with these classifier.model_kwargs/image size: {first}") from None
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    not_head = [k for k in result.missing_keys if not any(k == h or k.startswith(h + ".") for h in heads)]
    if not_head or result.unexpected_keys:
        raise ConfigError(f"{where} does not cover the backbone of {arch}: missing {not_head[:5]}"
                          f"{' ...' if len(not_head) > 5 else ''}, unexpected {result.unexpected_keys[:5]}")


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
    """The classifier's call of `data.arrays.check_images` (float, [0, 1], optional labels and shape)."""
    return check_images(images, name, labels=labels, num_classes=num_classes, shape=shape)
