"""Where torch runs: the one device resolver of the package (the classifier and the generators use it)."""

from __future__ import annotations

import torch

from vision_si.errors import ConfigError


def resolve_device(name: str = "auto", key: str = "classifier.device") -> torch.device:
    """`auto`: CUDA when present, else CPU; otherwise the named device, which must exist.

    `key` names the setting in errors (`classifier.device`, a generator preset's `device`).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{key}: {name!r} is not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {name!r} requested but CUDA is not available; use auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}: {name!r} requested but MPS is not available; use auto or cpu")
    return device
