"""Prediction: logits, probabilities and pre-logit embeddings, optionally cached per checkpoint and image."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy
import torch
from tqdm.auto import tqdm

from vision_si.classifier.checkpoint import TrainedClassifier
from vision_si.classifier.model import _check_images, _norm_tensors
from vision_si.errors import DataError
from vision_si.rundir import atomic_write_bytes


@dataclass
class Prediction:
    logits: np.ndarray  # N×K float32
    probs: np.ndarray  # N×K float32, softmax of logits
    embeddings: np.ndarray  # N×D float32, pre-logit features (`forward_head(..., pre_logits=True)`)


FLIPS = ((), (-1,), (-2,), (-2, -1))  # identity, horizontal, vertical, both


@torch.inference_mode()
def _forward(model: torch.nn.Module, images: np.ndarray, mean: torch.Tensor, std: torch.Tensor, batch_size: int,
             progress: bool = False, tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Logits and pre-logit embeddings of `images`, in batches, in eval mode.

    With `tta`, each image is also seen flipped horizontally, vertically and both; the logits are
    the mean log-probabilities over the four views and the embeddings their mean (only for data
    whose label does not depend on orientation; the training recipe records whether it applies).
    """
    was_training = model.training
    model.eval()
    device = mean.device
    cuda = device.type == "cuda"
    logits, embeddings = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="predict", unit="batch", disable=not progress):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size], dtype=np.float32)).to(device)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        views_logp, views_emb = [], []
        for dims in FLIPS if tta else ((),):
            v = torch.flip(x, dims) if dims else x
            with torch.autocast(device.type, enabled=cuda):
                features = model.forward_features((v - mean) / std)
                views_emb.append(model.forward_head(features, pre_logits=True).float())
                out = model.forward_head(features).float()
            views_logp.append(torch.log_softmax(out, dim=1) if tta else out)
        embeddings.append(torch.stack(views_emb).mean(0).cpu().numpy())
        logits.append(torch.stack(views_logp).mean(0).cpu().numpy())
    model.train(was_training)
    if not logits:
        return np.zeros((0, model.num_classes), np.float32), np.zeros((0, model.num_features), np.float32)
    return np.concatenate(logits), np.concatenate(embeddings)


def image_keys(images: np.ndarray) -> list[str]:
    """sha256 of each image's float32 pixels: the default cache key of `predict`."""
    return [hashlib.sha256(np.ascontiguousarray(im, dtype=np.float32).tobytes()).hexdigest() for im in images]


def _read_cache(folder: Path, wanted: set[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for shard in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safetensors.safe_open(str(shard), framework="np") as fh:
                keys = json.loads((fh.metadata() or {})["keys"])
                rows = [i for i, key in enumerate(keys) if key in wanted and key not in found]
                if rows:
                    logits, emb = fh.get_tensor("logits"), fh.get_tensor("embeddings")
                    found.update({keys[i]: (logits[i], emb[i]) for i in rows})
        except Exception:  # a damaged shard only costs a recomputation
            continue
    return found


def predict(clf: TrainedClassifier, images: np.ndarray, *, batch_size: int = 256, cache_dir: str | Path | None = None,
            keys: Sequence[str] | None = None, progress: bool = False) -> Prediction:
    """Logits, probabilities and pre-logit embeddings of N×C×H×W images in [0, 1].

    With `cache_dir`, results are stored per image under the checkpoint's sha256 and looked up by
    `keys` (default: `image_keys(images)`), so repeated predictions cost only the lookup.
    """
    meta = clf.meta
    images, _ = _check_images("predict images", images, shape=(meta["in_chans"], meta["image_size"], meta["image_size"]))
    mean, std = _norm_tensors(meta, clf.device)
    tta = bool(meta.get("tta", False))
    if cache_dir is None:
        logits, emb = _forward(clf.model, images, mean, std, batch_size, progress, tta)
    else:
        keys = list(keys) if keys is not None else image_keys(images)
        if len(keys) != len(images):
            raise DataError(f"predict: {len(images)} images but {len(keys)} cache keys")
        folder = Path(cache_dir) / clf.checkpoint_sha256
        found = _read_cache(folder, set(keys))
        todo = [i for i, key in enumerate(keys) if key not in found]
        if todo:
            new_logits, new_emb = _forward(clf.model, images[todo], mean, std, batch_size, progress, tta)
            new_keys = [keys[i] for i in todo]
            found.update({key: (new_logits[j], new_emb[j]) for j, key in enumerate(new_keys)})
            folder.mkdir(parents=True, exist_ok=True)
            name = hashlib.sha256("\n".join(new_keys).encode()).hexdigest()[:24]
            atomic_write_bytes(folder / f"{name}.safetensors", safetensors.numpy.save(
                {"logits": new_logits, "embeddings": new_emb}, metadata={"keys": json.dumps(new_keys)}))
        logits = np.stack([found[key][0] for key in keys]).astype(np.float32) if keys else np.zeros((0, meta["num_classes"]), np.float32)
        emb = np.stack([found[key][1] for key in keys]).astype(np.float32) if keys else np.zeros((0, clf.model.num_features), np.float32)
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    return Prediction(logits=logits, probs=probs, embeddings=emb)
