"""Classifier checkpoints, written and read without pickle.

A checkpoint folder holds `model.safetensors` (plain timm state dict, so it also works as a timm
pretrained file) and `model.json` (everything to rebuild it: arch, classes, in_chans, image size,
mean/std from `resolve_model_data_config`, kwargs, seed, steps, sha256 of the weights); training
adds `history.json`. All written atomically; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch

from vision_si.classifier.model import _norm_tensors, resolve_device
from vision_si.errors import DataError
from vision_si.rundir import atomic_write_bytes, atomic_write_json

FORMAT = "vision_si.classifier/1"
WEIGHTS_FILE, META_FILE, HISTORY_FILE, RESUME_FILE = "model.safetensors", "model.json", "history.json", "resume.safetensors"
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".tar")


@dataclass
class TrainedClassifier:
    model: torch.nn.Module
    meta: dict[str, Any]
    path: Path
    checkpoint_sha256: str

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable logits of N×C×H×W images in [0, 1] on the model's device (normalised here)."""
        mean, std = _norm_tensors(self.meta, images.device)
        return self.model((images - mean) / std)


def save_checkpoint(out_dir: str | Path, state_dict: dict[str, torch.Tensor], meta: dict) -> str:
    """Write `model.safetensors`, then `model.json` with its sha256 (the json's presence marks it complete)."""
    out_dir = Path(out_dir)
    data = safetensors.torch.save({k: v.contiguous() for k, v in state_dict.items()}, metadata={"format": "pt"})
    sha = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(out_dir / WEIGHTS_FILE, data)
    atomic_write_json(out_dir / META_FILE, {**meta, "weights_sha256": sha})
    return sha


def _finished(out_dir: Path, fingerprint: str) -> dict | None:
    try:
        meta = json.loads((out_dir / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("train_fingerprint") != fingerprint or not (out_dir / WEIGHTS_FILE).is_file():
        return None
    return meta


_META_KEYS = ("arch", "classes", "in_chans", "image_size", "mean", "std", "create_kwargs", "weights_sha256")


def load_classifier(path: str | Path, device: str | torch.device = "auto", *, arch: str | None = None,
                    classes: Sequence[str] | None = None) -> TrainedClassifier:
    """Load a checkpoint folder (or its `model.json`/`model.safetensors`) without unpickling anything.

    `arch` and `classes`, when given, must match the checkpoint; a mismatch, a missing key, weights
    whose sha256 differs from `model.json`, or a file that is not safetensors raise `DataError`
    naming the file.
    """
    path = Path(path)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise DataError(f"{path}: pickled torch files are never loaded; a classifier checkpoint is a folder "
                        f"with {WEIGHTS_FILE} and {META_FILE}")
    folder = path if path.is_dir() or not path.suffix else path.parent
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{meta_path}: classifier checkpoint not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{meta_path}: not a readable JSON checkpoint description ({exc})") from None
    missing = [key for key in _META_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise DataError(f"{meta_path}: missing key(s) {missing}; not a vision_si classifier checkpoint")
    if arch is not None and meta["arch"] != arch:
        raise DataError(f"{meta_path}: checkpoint is a {meta['arch']!r}, expected {arch!r}")
    if classes is not None and list(meta["classes"]) != list(classes):
        raise DataError(f"{meta_path}: checkpoint classes {meta['classes']} differ from the expected {list(classes)}")
    try:
        data = weights_path.read_bytes()
    except OSError as exc:
        raise DataError(f"{weights_path}: cannot read the weights ({exc.strerror})") from None
    sha = hashlib.sha256(data).hexdigest()
    if sha != meta["weights_sha256"]:
        raise DataError(f"{weights_path}: sha256 {sha[:12]}… differs from {meta_path.name} "
                        f"({str(meta['weights_sha256'])[:12]}…); the file was changed or truncated")
    try:
        state = safetensors.torch.load(data)
    except Exception as exc:  # safetensors parses a JSON header and raw buffers; it never unpickles
        raise DataError(f"{weights_path}: not a safetensors file ({exc})") from None
    try:
        model = timm.create_model(meta["arch"], pretrained=False, **meta["create_kwargs"])
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as exc:
        raise DataError(f"{weights_path}: weights do not fit {meta['arch']} {meta['create_kwargs']}: {exc}") from None
    device = resolve_device(device) if isinstance(device, str) else device
    model.to(device).eval()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return TrainedClassifier(model=model, meta=meta, path=folder, checkpoint_sha256=sha)
