"""Resume state of an interrupted training run, and the fingerprint of the arguments it belongs to.

Every `checkpoint_every` steps the whole training state (weights, EMA, best-so-far, optimizer
tensors, RNG states) goes to `resume.safetensors`, with the scalars (step, optimizer param groups,
scheduler, grad scaler, history) as JSON in the same file's header, so one `os.replace` commits it.
A call with the same arguments and `out_dir` continues from there and ends with the same weights as
an uninterrupted run. The arguments are compared through a fingerprint (config, seed, classes, data
bytes, augmentation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from vision_si.config import ClassifierConfig
from vision_si.rundir import atomic_write_bytes


def _fingerprint(cfg: ClassifierConfig, seed: int, classes: Sequence[str], arrays: Sequence[Any],
                 extra_ids: Sequence[str] | None, augment: Any, init: str | None = None) -> str:
    """What decides the trained weights; settings that do not (device, workers) are left out."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("device", "num_workers", "predict_batch_size")}
    if augment is None:
        aug: Any = None
    elif hasattr(augment, "set_random_seed"):
        import albumentations as A

        aug = A.to_dict(augment)
    else:
        aug = f"{type(augment).__module__}.{getattr(augment, '__qualname__', type(augment).__qualname__)}"
    h = hashlib.sha256(json.dumps({"cfg": settings, "seed": seed, "classes": list(classes),
                                   "extra_ids": list(extra_ids) if extra_ids is not None else None,
                                   "augment": aug, "init": init}, sort_keys=True, default=str).encode())
    for a in arrays:
        a = None if a is None else np.ascontiguousarray(a)
        h.update(b"none" if a is None else f"{a.shape}{a.dtype}".encode())
        if a is not None:
            h.update(a.data)
    return h.hexdigest()


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def _save_resume(path: Path, info: dict, model, ema, best: dict | None, optimizer, rng: dict) -> None:
    tensors = {f"model.{k}": v for k, v in _cpu_state(model).items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in _cpu_state(ema.module).items()})
    if best is not None:
        tensors.update({f"best.{k}": v for k, v in best.items()})
    opt = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for pid, state in opt["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    tensors.update(rng)
    info = {**info, "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars}}
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata={"vision_si_resume": json.dumps(info)}))


def _load_resume(path: Path, fingerprint: str) -> tuple[dict, dict] | None:
    if not path.is_file():
        return None
    try:
        with safetensors.safe_open(str(path), framework="pt") as fh:
            info = json.loads((fh.metadata() or {})["vision_si_resume"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except Exception as exc:  # a foreign or damaged file: start afresh rather than fail the run
        warnings.warn(f"{path}: unreadable resume state ({exc}); training from the start", stacklevel=3)
        return None
    if info.get("fingerprint") != fingerprint:
        warnings.warn(f"{path}: resume state is from other arguments or data; training from the start", stacklevel=3)
        return None
    return info, tensors


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _optimizer_state(info: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state: dict[int, dict] = {}
    for key, value in _prefixed(tensors, "optim.").items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in info["optimizer"]["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in info["optimizer"]["param_groups"]]
    return {"state": state, "param_groups": groups}
