"""timm classifiers: create, train on a fixed step budget, checkpoint without pickle, predict.

- `create_classifier`: any timm architecture by name; weights from scratch (`pretrained: none`), a
  local file through timm's own `pretrained_cfg_overlay=dict(file=...)`, or the hub (`hub`, online
  only). A local ImageNet file is adapted by timm: first conv to `in_chans`, head dropped when the
  class count differs.
- `train_classifier`: AdamW (timm's optimizer factory: no decay on biases and norms), linear
  warm-up then cosine decay, label smoothing, the loader of `vision_si.data.loader` (balanced
  sampling and the bounded synthetic share), optional EMA (`timm.utils.ModelEmaV3`), AMP and
  channels_last on CUDA only, gradient clipping, exactly `cfg.steps` optimizer steps, optional
  best-on-val selection (macro-F1, then val loss) every `cfg.eval_every` steps.
- Checkpoint in `out_dir`: `model.safetensors` (plain timm state dict, so it also works as a timm
  pretrained file) and `model.json` (everything to rebuild it: arch, classes, in_chans, image size,
  mean/std from `resolve_model_data_config`, kwargs, seed, steps, sha256 of the weights); plus
  `history.json`. All written atomically; nothing is ever unpickled.
- Resume: every `checkpoint_every` steps the whole training state (weights, EMA, best-so-far,
  optimizer tensors, RNG states) goes to `resume.safetensors`, with the scalars (step, optimizer
  param groups, scheduler, grad scaler, history) as JSON in the same file's header, so one
  `os.replace` commits it. A call with the same arguments and `out_dir` continues from there and
  ends with the same weights as an uninterrupted run; a finished `out_dir` is loaded, not retrained.
  The arguments are compared through a fingerprint (config, seed, classes, data bytes, augmentation).
- Determinism: for a seed and the same data on CPU, the weights are the same bit for bit (global
  RNG forked and seeded, deterministic algorithms, per-draw sampler and augmentation seeds). Same
  thread count assumed: float sums may associate differently across thread counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import safetensors.torch
import timm
import torch
from timm.data import resolve_model_data_config
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from tqdm.auto import tqdm

from vision_si.config import ClassifierConfig
from vision_si.data.loader import make_train_loader
from vision_si.errors import ConfigError, DataError
from vision_si.metrics import classification_metrics
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


@dataclass
class Prediction:
    logits: np.ndarray  # N×K float32
    probs: np.ndarray  # N×K float32, softmax of logits
    embeddings: np.ndarray  # N×D float32, pre-logit features (`forward_head(..., pre_logits=True)`)


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


# --------------------------------------------------------------------------- creation


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


# --------------------------------------------------------------------------- input checks


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


# --------------------------------------------------------------------------- training


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup  # full rate reached on the last warm-up step
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _fingerprint(cfg: ClassifierConfig, seed: int, classes: Sequence[str], arrays: Sequence[Any],
                 extra_ids: Sequence[str] | None, augment: Any) -> str:
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
                                   "augment": aug}, sort_keys=True, default=str).encode())
    for a in arrays:
        a = None if a is None else np.ascontiguousarray(a)
        h.update(b"none" if a is None else f"{a.shape}{a.dtype}".encode())
        if a is not None:
            h.update(a.data)
    return h.hexdigest()


@contextlib.contextmanager
def _deterministic(device: torch.device):
    """Deterministic kernels while training (warn-only off CPU), restoring the caller's setting after."""
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    bench = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
        torch.backends.cudnn.benchmark = bench


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


def train_classifier(cfg: ClassifierConfig, images: np.ndarray, labels: np.ndarray, *, classes: Sequence[str],
                     seed: int, out_dir: str | Path, val_images: np.ndarray | None = None,
                     val_labels: np.ndarray | None = None, extra_images: np.ndarray | None = None,
                     extra_labels: np.ndarray | None = None, extra_ids: Sequence[str] | None = None,
                     augment: Any = None, progress: bool = True, checkpoint_every: int | None = None,
                     callback: Callable[[int, dict], None] | None = None) -> TrainedClassifier:
    """Train `cfg.arch` for exactly `cfg.steps` optimizer steps and checkpoint it into `out_dir`.

    `images`/`labels` are the real training data, `extra_*` synthetic samples mixed in with at most
    `cfg.synthetic_share` synthetic draws per real draw of a class. `val_*` feed the history and,
    with `cfg.select_best_on_val`, the choice of the saved weights. `augment` is an albumentations
    transform (seeded per draw) or None. `checkpoint_every` (default `cfg.eval_every`) sets how often
    the resume state is written; `callback(step, record)` runs after every step.
    """
    classes = list(classes)
    k = len(classes)
    images, labels = _check_images("train images", images, labels, k)
    shape = images.shape[1:]
    if extra_images is not None and len(extra_images):
        extra_images, extra_labels = _check_images("extra images", extra_images, extra_labels, k, shape)
    else:
        extra_images, extra_labels, extra_ids = None, None, None
    has_val = val_images is not None and len(val_images) > 0
    if has_val:
        val_images, val_labels = _check_images("val images", val_images, val_labels, k, shape)
    in_chans, image_size = int(shape[0]), int(shape[1])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    fingerprint = _fingerprint(cfg, seed, classes, [images, labels, extra_images, extra_labels, val_images, val_labels],
                               extra_ids, augment)
    done = _finished(out_dir, fingerprint)
    if done is not None:
        return load_classifier(out_dir, device)

    cuda = device.type == "cuda"
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []
    with _deterministic(device), torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        model, create_kwargs = _creation(cfg, k, in_chans, image_size)
        mean, std = normalisation(model, in_chans)
        model.to(device)
        if cuda:
            model.to(memory_format=torch.channels_last)
        optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: _warmup_cosine(s, cfg.warmup_steps, cfg.steps))
        ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
        amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)
        criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        mean_t, std_t = _norm_tensors({"mean": mean, "std": std}, device)

        start, best, best_key, best_step = 0, None, None, None
        history: dict[str, Any] = {"train": [], "val": []}
        resumed = _load_resume(out_dir / RESUME_FILE, fingerprint)
        if resumed is not None:
            info, tensors = resumed
            model.load_state_dict(_prefixed(tensors, "model."))
            if ema is not None:
                ema.module.load_state_dict(_prefixed(tensors, "ema."))
            optimizer.load_state_dict(_optimizer_state(info, tensors))
            scheduler.load_state_dict(info["scheduler"])
            scaler.load_state_dict(info["scaler"])
            best = _prefixed(tensors, "best.") or None
            best_key, best_step = info["best_key"], info["best_step"]
            start, history = info["step"], info["history"]

        loader = make_train_loader(
            images, labels, batch_size=cfg.batch_size, steps=cfg.steps, seed=seed, augment=augment,
            balanced=cfg.balanced_sampling, extra_images=extra_images, extra_labels=extra_labels, extra_ids=extra_ids,
            synthetic_share=cfg.synthetic_share, num_workers=cfg.num_workers, start_step=start)
        batches = iter(loader)
        if resumed is not None:  # after the loader is built, so nothing between here and step 1 draws from it
            torch.set_rng_state(tensors["rng.cpu"])
            if cuda:
                torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        every = checkpoint_every or cfg.eval_every
        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.arch}", unit="step", disable=not progress)
        model.train()
        tick = time.perf_counter()
        for step, batch in enumerate(batches, start=start + 1):
            x = batch["image"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=cuda):
                loss = criterion(model((x - mean_t) / std_t), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            if ema is not None:
                ema.update(model, step=step)
            now = time.perf_counter()
            record = {"step": step, "loss": loss.detach().item(), "lr": lr, "images_per_s": len(y) / max(now - tick, 1e-9)}
            tick = now
            history["train"].append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.0f}", refresh=False)

            if has_val and (step % cfg.eval_every == 0 or step == cfg.steps):
                scored = ema.module if ema is not None else model
                val = _evaluate(scored, val_images, val_labels, classes, mean_t, std_t, cfg.predict_batch_size)
                history["val"].append({"step": step, **val})
                key = [val["macro_f1"], -val["loss"]]
                if cfg.select_best_on_val and (best_key is None or key > best_key):
                    best, best_key, best_step = _cpu_state(scored), key, step
                model.train()
            if step % every == 0 and step < cfg.steps:
                rng = {"rng.cpu": torch.get_rng_state()}
                if cuda:
                    rng["rng.cuda"] = torch.cuda.get_rng_state(device)
                _save_resume(out_dir / RESUME_FILE, {
                    "fingerprint": fingerprint, "step": step, "history": history, "best_key": best_key,
                    "best_step": best_step, "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                }, model, ema, best, optimizer, rng)
            if callback is not None:
                callback(step, record)
        bar.close()

    final = ema.module if ema is not None else model
    weights = best if best is not None else _cpu_state(final)
    selected = best_step if best is not None else cfg.steps
    history["selected_step"] = selected
    val_at = next((v for v in history["val"] if v["step"] == selected), None)
    meta = {
        "format": FORMAT, "arch": cfg.arch, "classes": classes, "num_classes": k, "in_chans": in_chans,
        "image_size": image_size, "mean": mean, "std": std, "model_kwargs": cfg.model_kwargs,
        "create_kwargs": create_kwargs, "pretrained": cfg.pretrained, "seed": seed, "steps": cfg.steps,
        "selected_step": selected, "ema": cfg.ema, "val": val_at, "n_real": len(labels),
        "n_synthetic": 0 if extra_labels is None else len(extra_labels), "train_fingerprint": fingerprint,
        "device": str(device), "timm_version": timm.__version__, "torch_version": torch.__version__,
    }
    atomic_write_json(out_dir / HISTORY_FILE, history)
    save_checkpoint(out_dir, weights, meta)
    (out_dir / RESUME_FILE).unlink(missing_ok=True)
    return load_classifier(out_dir, device)


@torch.inference_mode()
def _forward(model: torch.nn.Module, images: np.ndarray, mean: torch.Tensor, std: torch.Tensor, batch_size: int,
             progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Logits and pre-logit embeddings of `images`, in batches, in eval mode."""
    was_training = model.training
    model.eval()
    device = mean.device
    cuda = device.type == "cuda"
    logits, embeddings = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="predict", unit="batch", disable=not progress):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size], dtype=np.float32)).to(device)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, enabled=cuda):
            features = model.forward_features((x - mean) / std)
            embeddings.append(model.forward_head(features, pre_logits=True).float().cpu().numpy())
            logits.append(model.forward_head(features).float().cpu().numpy())
    model.train(was_training)
    if not logits:
        return np.zeros((0, model.num_classes), np.float32), np.zeros((0, model.num_features), np.float32)
    return np.concatenate(logits), np.concatenate(embeddings)


def _evaluate(model, images, labels, classes, mean, std, batch_size) -> dict[str, float]:
    logits, _ = _forward(model, images, mean, std, batch_size)
    loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    m = classification_metrics(labels, logits.argmax(1), classes)
    return {"loss": loss, "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
            "macro_f1": m["macro_f1"]}


# --------------------------------------------------------------------------- checkpoints


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


# --------------------------------------------------------------------------- prediction


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
    if cache_dir is None:
        logits, emb = _forward(clf.model, images, mean, std, batch_size, progress)
    else:
        keys = list(keys) if keys is not None else image_keys(images)
        if len(keys) != len(images):
            raise DataError(f"predict: {len(images)} images but {len(keys)} cache keys")
        folder = Path(cache_dir) / clf.checkpoint_sha256
        found = _read_cache(folder, set(keys))
        todo = [i for i, key in enumerate(keys) if key not in found]
        if todo:
            new_logits, new_emb = _forward(clf.model, images[todo], mean, std, batch_size, progress)
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
