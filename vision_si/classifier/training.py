"""`train_classifier`: a timm classifier trained on a fixed step budget, resumable, deterministic on CPU.

The recipe, for small imbalanced imaging data: AdamW (timm's optimizer factory: no decay on biases
and norms), linear warm-up then cosine decay over a budget sized in epochs of the real training
images (`cfg.epochs`) or in steps, label smoothing, class-weighted real draws (`cfg.sampling`) and
the bounded synthetic slots of `vision_si.data.loader`, optional logit adjustment for the class
prior of the draws (`cfg.loss`), optional EMA (`timm.utils.ModelEmaV3`), AMP and channels_last on
CUDA only, gradient clipping, optional best-on-val selection (macro-F1, then val loss) every
`cfg.eval_every` steps. `init_from` starts from another checkpoint's weights (the gate's warm
start). A crashed run resumes from its resume state (`vision_si.classifier.resume`); a finished
`out_dir` is loaded, not retrained.

Determinism: for a seed and the same data on CPU, the weights are the same bit for bit (global
RNG forked and seeded, deterministic algorithms, per-draw sampler and augmentation seeds). Same
thread count assumed: float sums may associate differently across thread counts.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from tqdm.auto import tqdm

from vision_si.classifier.checkpoint import (
    FORMAT,
    HISTORY_FILE,
    RESUME_FILE,
    TrainedClassifier,
    _finished,
    load_classifier,
    save_checkpoint,
)
from vision_si.classifier.inference import _forward
from vision_si.classifier.model import _check_images, _creation, _norm_tensors, normalisation, resolve_device
from vision_si.classifier.resume import (
    _cpu_state,
    _fingerprint,
    _load_resume,
    _optimizer_state,
    _prefixed,
    _save_resume,
)
from vision_si.config import ClassifierConfig
from vision_si.data.loader import make_train_loader, real_class_weights, synthetic_rates
from vision_si.errors import DataError
from vision_si.metrics import classification_metrics
from vision_si.rundir import atomic_write_json


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup  # full rate reached on the last warm-up step
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


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


def train_steps(cfg: ClassifierConfig, n_real: int) -> int:
    """The step budget: `cfg.epochs` epochs of the real training images, else `cfg.steps`."""
    if cfg.epochs is None:
        return int(cfg.steps)
    return max(1, math.ceil(cfg.epochs * n_real / cfg.batch_size))


def warmup_steps(cfg: ClassifierConfig, steps: int) -> int:
    return int(cfg.warmup_steps) if cfg.warmup_steps is not None else max(1, round(0.05 * steps))


def draw_prior(cfg: ClassifierConfig, labels: np.ndarray, extra_labels: np.ndarray | None, k: int) -> np.ndarray:
    """Expected class distribution of the training draws (real draws plus synthetic slots)."""
    real_counts = np.bincount(labels, minlength=k)
    share = real_class_weights(real_counts, cfg.sampling) * cfg.batch_size
    if extra_labels is not None and len(extra_labels):
        share = share + synthetic_rates(real_counts, np.bincount(extra_labels, minlength=k), share / cfg.batch_size,
                                        batch_size=cfg.batch_size, synthetic_share=cfg.synthetic_share)
    return share / share.sum()


def train_classifier(cfg: ClassifierConfig, images: np.ndarray, labels: np.ndarray, *, classes: Sequence[str],
                     seed: int, out_dir: str | Path, val_images: np.ndarray | None = None,
                     val_labels: np.ndarray | None = None, extra_images: np.ndarray | None = None,
                     extra_labels: np.ndarray | None = None, extra_ids: Sequence[str] | None = None,
                     augment: Any = None, progress: bool = True, checkpoint_every: int | None = None,
                     callback: Callable[[int, dict], None] | None = None,
                     init_from: TrainedClassifier | None = None) -> TrainedClassifier:
    """Train `cfg.arch` for its step budget (`train_steps`) and checkpoint it into `out_dir`.

    `images`/`labels` are the real training data, `extra_*` synthetic samples mixed in with at most
    `cfg.synthetic_share` synthetic draws per real draw of a class. `val_*` feed the history and,
    with `cfg.select_best_on_val`, the choice of the saved weights. `augment` is an albumentations
    transform (seeded per draw) or None. `checkpoint_every` (default `cfg.eval_every`) sets how often
    the resume state is written; `callback(step, record)` runs after every step. `init_from` (a
    checkpoint of the same architecture, classes and input shape) gives the starting weights instead
    of `seed`'s random initialisation.
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
                               extra_ids, augment, init=init_from.checkpoint_sha256 if init_from is not None else None)
    steps = train_steps(cfg, len(labels))
    warmup = warmup_steps(cfg, steps)
    done = _finished(out_dir, fingerprint)
    if done is not None:
        return load_classifier(out_dir, device)

    cuda = device.type == "cuda"
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []
    with _deterministic(device), torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        model, create_kwargs = _creation(cfg, k, in_chans, image_size)
        if init_from is not None:
            _check_init(init_from, cfg.arch, classes, in_chans, image_size)
            model.load_state_dict(init_from.model.state_dict())
        mean, std = normalisation(model, in_chans)
        model.to(device)
        if cuda:
            model.to(memory_format=torch.channels_last)
        optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: _warmup_cosine(s, warmup, steps))
        ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
        amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)
        criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        prior = draw_prior(cfg, labels, extra_labels, k)
        # logit adjustment: the loss sees logits + tau*log(prior), so the raw logits learn a balanced posterior
        adjust = (torch.as_tensor(cfg.logit_adjust_tau * np.log(np.maximum(prior, 1e-12)), dtype=torch.float32,
                                  device=device) if cfg.loss == "logit_adjusted" else None)
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
            images, labels, batch_size=cfg.batch_size, steps=steps, seed=seed, augment=augment,
            sampling=cfg.sampling, extra_images=extra_images, extra_labels=extra_labels, extra_ids=extra_ids,
            synthetic_share=cfg.synthetic_share, num_workers=cfg.num_workers, start_step=start)
        batches = iter(loader)
        if resumed is not None:  # after the loader is built, so nothing between here and step 1 draws from it
            torch.set_rng_state(tensors["rng.cpu"])
            if cuda:
                torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        every = checkpoint_every or cfg.eval_every
        bar = tqdm(total=steps, initial=start, desc=f"train {cfg.arch}", unit="step", disable=not progress)
        model.train()
        tick = time.perf_counter()
        for step, batch in enumerate(batches, start=start + 1):
            x = batch["image"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=cuda):
                logits = model((x - mean_t) / std_t)
                loss = criterion(logits if adjust is None else logits + adjust, y)
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

            if has_val and (step % cfg.eval_every == 0 or step == steps):
                scored = ema.module if ema is not None else model
                val = _evaluate(scored, val_images, val_labels, classes, mean_t, std_t, cfg.predict_batch_size, cfg.tta)
                history["val"].append({"step": step, **val})
                key = [val["macro_f1"], -val["loss"]]
                if cfg.select_best_on_val and (best_key is None or key > best_key):
                    best, best_key, best_step = _cpu_state(scored), key, step
                model.train()
            if step % every == 0 and step < steps:
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
    if best is not None:
        final.load_state_dict(best)
    if cfg.bn_recalibrate:
        recalibrate_batchnorm(final, images, mean_t, std_t, cfg.predict_batch_size)
    weights = _cpu_state(final)
    selected = best_step if best is not None else steps
    history["selected_step"] = selected
    val_at = next((v for v in history["val"] if v["step"] == selected), None)
    meta = {
        "format": FORMAT, "arch": cfg.arch, "classes": classes, "num_classes": k, "in_chans": in_chans,
        "image_size": image_size, "mean": mean, "std": std, "model_kwargs": cfg.model_kwargs,
        "create_kwargs": create_kwargs, "pretrained": cfg.pretrained, "seed": seed, "steps": steps,
        "selected_step": selected, "ema": cfg.ema, "val": val_at, "n_real": len(labels),
        "n_synthetic": 0 if extra_labels is None else len(extra_labels), "train_fingerprint": fingerprint,
        "init_from": None if init_from is None else {"path": str(init_from.path), "sha256": init_from.checkpoint_sha256},
        "draw_prior": [float(v) for v in prior], "loss": cfg.loss, "tta": cfg.tta,
        "bn_recalibrated": cfg.bn_recalibrate,
        "device": str(device), "timm_version": timm.__version__, "torch_version": torch.__version__,
    }
    atomic_write_json(out_dir / HISTORY_FILE, history)
    save_checkpoint(out_dir, weights, meta)
    (out_dir / RESUME_FILE).unlink(missing_ok=True)
    return load_classifier(out_dir, device)


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, images: np.ndarray, mean: torch.Tensor, std: torch.Tensor,
                          batch_size: int) -> None:
    """BatchNorm running statistics re-estimated as exact averages over `images` (no augmentation)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    was = model.training
    model.train()
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size], dtype=np.float32)).to(mean.device)
        model((x - mean) / std)
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    model.train(was)


def _check_init(init: TrainedClassifier, arch: str, classes: list[str], in_chans: int, image_size: int) -> None:
    meta = init.meta
    theirs = (meta.get("arch"), list(meta.get("classes", [])), meta.get("in_chans"), meta.get("image_size"))
    if theirs != (arch, classes, in_chans, image_size):
        raise DataError(f"init_from {init.path}: its arch, classes, channels and size {theirs} differ from this "
                        f"training's {(arch, classes, in_chans, image_size)}")


def _evaluate(model, images, labels, classes, mean, std, batch_size, tta=False) -> dict[str, float]:
    logits, _ = _forward(model, images, mean, std, batch_size, tta=tta)
    loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    m = classification_metrics(labels, logits.argmax(1), classes)
    return {"loss": loss, "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
            "macro_f1": m["macro_f1"]}
