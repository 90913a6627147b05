"""The default backend `ddpm`: a class-conditional diffusion model trained on the user's own training split.

A diffusers `UNet2DModel` with `num_class_embeds = n_classes + 1` (the last index is the null class:
labels are dropped to it with probability `cfg_dropout` during training, which enables
classifier-free guidance), trained on real training images only, at the preset's resolution, in
[-1, 1], with the data's channel count (grayscale stays 1). EMA weights (diffusers `EMAModel`, with
warm-up so short CPU runs are not dominated by the first steps) are what gets sampled.

Caching and crash safety. With a `cache_dir`, the trained generator is stored under
`cache_dir/<key>/` (a `ClassConditionalPipeline.save_pretrained` folder plus `meta.json`), where
`key` = sha256 of the training pixels and labels, the class names, the training part of the preset
(resolution, channels, unet, train) and the seed `fit` gets (the run's, or `generate.train_seed` when
set, so runs of several classifier seeds can share one generator); sampling settings are not part
of the key, so a new sampler or step count reuses the model. While training, a checkpoint is written
every `checkpoint_every` steps to `cache_dir/<key>.partial/checkpoint/` (UNet via `save_pretrained`, EMA
and AdamW state as safetensors + JSON, the data-order RNG state; no pickle), and a restarted fit
continues from it to the same weights; a checkpoint that cannot be read back (damaged, or a file
replaced: nothing there is ever unpickled) is named in a warning, discarded, and training restarts
from step 0, which reaches the same weights too. A `<key>.lock` file keeps two processes from training the
same model at once: the second waits and then loads the first one's result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from vision_si.data.arrays import check_images
from vision_si.devices import resolve_device
from vision_si.errors import DataError
from vision_si.generators.base import (
    MODES,
    PipelineGenerator,
    match_data,
    merge_preset_section,
    preset_check,
    register_generator,
    to_data_batch,
)
from vision_si.generators.pipeline import SAMPLERS, ClassConditionalPipeline, make_scheduler
from vision_si.rundir import PidLock

UNET_DEFAULTS: dict[str, Any] = {"block_out_channels": [32, 64, 64], "layers_per_block": 1, "attention": False,
                                 "norm_num_groups": 16}
TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 600, "batch_size": 32, "lr": 2e-3, "warmup_steps": 50, "weight_decay": 0.0, "grad_clip": 1.0,
    "ema_decay": 0.999, "cfg_dropout": 0.1, "class_balance": 0.5, "augment": {"hflip": False, "vflip": False},
    "checkpoint_every": 200, "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
}
SAMPLE_DEFAULTS: dict[str, Any] = {"sampler": "dpmsolver++", "steps": 15, "guidance_scale": 2.0}
CACHE_VERSION = "vision_si-ddpm-1"


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module's weights serialised with safetensors (deterministic for equal tensors)."""
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return hashlib.sha256(safetensors.torch.save(state)).hexdigest()


def build_unet(n_classes: int, channels: int, resolution: int, unet: dict[str, Any]) -> UNet2DModel:
    """A class-conditional `UNet2DModel`; `attention` puts self-attention in the lowest-resolution level."""
    widths = [int(w) for w in unet["block_out_channels"]]
    last = len(widths) - 1
    down = tuple("AttnDownBlock2D" if unet["attention"] and i == last else "DownBlock2D" for i in range(len(widths)))
    up = tuple("AttnUpBlock2D" if unet["attention"] and i == 0 else "UpBlock2D" for i in range(len(widths)))
    return UNet2DModel(sample_size=resolution, in_channels=channels, out_channels=channels,
                       block_out_channels=tuple(widths), layers_per_block=int(unet["layers_per_block"]),
                       down_block_types=down, up_block_types=up, norm_num_groups=int(unet["norm_num_groups"]),
                       num_class_embeds=n_classes + 1, attention_head_dim=8)


@register_generator("ddpm")
class DDPMGenerator(PipelineGenerator):
    """Class-conditional DDPM trained on the training split (sklearn shape: `fit` returns self).

    Parameters are the preset's keys: `resolution`, `channels` ('auto', 1 or 3), `unet`, `train` and
    `sample` sections (defaults in `UNET_DEFAULTS`, `TRAIN_DEFAULTS`, `SAMPLE_DEFAULTS`), `device`.
    """

    def __init__(self, name: str = "custom", resolution: int = 32, channels: str | int = "auto",
                 unet: dict[str, Any] | None = None, train: dict[str, Any] | None = None,
                 sample: dict[str, Any] | None = None, device: str = "auto") -> None:
        self.name = name
        self.resolution = resolution
        self.channels = channels
        self.unet = unet
        self.train = train
        self.sample = sample
        self.device = device

    # ------------------------------------------------------------------ settings
    def settings(self) -> dict[str, Any]:
        """The preset with defaults filled in, checked; raises `ConfigError` naming the bad key."""
        p = self.name
        unet = merge_preset_section("unet", self.unet, UNET_DEFAULTS, p)
        train = merge_preset_section("train", self.train, TRAIN_DEFAULTS, p)
        sample = merge_preset_section("sample", self.sample, SAMPLE_DEFAULTS, p)
        train["augment"] = merge_preset_section("train.augment", train["augment"], TRAIN_DEFAULTS["augment"], p)
        preset_check(isinstance(self.resolution, int) and 8 <= self.resolution <= 1024 and self.resolution % 8 == 0, p,
               "resolution", self.resolution, "a multiple of 8 from 8 to 1024")
        preset_check(self.channels in ("auto", 1, 3), p, "channels", self.channels, "auto, 1 or 3")
        widths = unet["block_out_channels"]
        preset_check(isinstance(widths, list) and 1 <= len(widths) <= 5 and all(isinstance(w, int) and w > 0 for w in widths),
               p, "unet.block_out_channels", widths, "a list of 1 to 5 positive integers")
        preset_check(all(w % int(unet["norm_num_groups"]) == 0 for w in widths), p, "unet.norm_num_groups",
               unet["norm_num_groups"], "must divide every block_out_channels entry")
        preset_check(self.resolution % 2 ** (len(widths) - 1) == 0, p, "resolution", self.resolution,
               f"divisible by {2 ** (len(widths) - 1)} for {len(widths)} UNet levels")
        preset_check(int(unet["layers_per_block"]) >= 1, p, "unet.layers_per_block", unet["layers_per_block"], ">= 1")
        preset_check(int(train["steps"]) >= 1, p, "train.steps", train["steps"], ">= 1")
        preset_check(int(train["batch_size"]) >= 1, p, "train.batch_size", train["batch_size"], ">= 1")
        preset_check(0 < float(train["lr"]) <= 1, p, "train.lr", train["lr"], "0 < x <= 1")
        preset_check(0 < float(train["ema_decay"]) < 1, p, "train.ema_decay", train["ema_decay"], "0 < x < 1")
        preset_check(0 <= float(train["cfg_dropout"]) < 1, p, "train.cfg_dropout", train["cfg_dropout"], "0 <= x < 1")
        preset_check(0 <= float(train["class_balance"]) <= 1, p, "train.class_balance", train["class_balance"], "0 to 1")
        preset_check(train["prediction_type"] in ("epsilon", "v_prediction"), p, "train.prediction_type",
               train["prediction_type"], "epsilon or v_prediction")
        preset_check(train["beta_schedule"] in ("linear", "scaled_linear", "squaredcos_cap_v2"), p, "train.beta_schedule",
               train["beta_schedule"], "linear, scaled_linear or squaredcos_cap_v2")
        preset_check(int(train["checkpoint_every"]) >= 1, p, "train.checkpoint_every", train["checkpoint_every"], ">= 1")
        preset_check(sample["sampler"] in SAMPLERS, p, "sample.sampler", sample["sampler"], ", ".join(SAMPLERS))
        preset_check(isinstance(sample["steps"], int) and sample["steps"] >= 1, p, "sample.steps", sample["steps"], ">= 1")
        preset_check(float(sample["guidance_scale"]) >= 0, p, "sample.guidance_scale", sample["guidance_scale"], ">= 0")
        return {"resolution": self.resolution, "channels": self.channels, "unet": unet, "train": train,
                "sample": sample}


    # ------------------------------------------------------------------ fit
    def fit(self, images: np.ndarray, labels: np.ndarray, classes: list[str], *, seed: int,
            cache_dir: str | Path | None = None, progress: bool = True,
            on_step: Callable[[int], None] | None = None) -> DDPMGenerator:
        """Train on `images` (N×C×H×W in [0, 1]) and `labels`, or load the cached model for the same inputs."""
        settings = self.settings()
        images, labels = _check_training_data(images, labels, classes)
        self.classes_ = list(classes)
        self.data_channels_, self.data_size_ = int(images.shape[1]), int(images.shape[2])
        self.model_channels_ = self.data_channels_ if settings["channels"] == "auto" else int(settings["channels"])
        self.cache_key_ = cache_key(images, labels, classes, settings, seed)
        self.cache_hit_, self.trained_steps_ = False, 0
        if cache_dir is None:
            self._train(images, labels, seed, None, progress, on_step)
            return self
        cache_dir = Path(cache_dir)
        final = cache_dir / self.cache_key_
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _training_lock(cache_dir / f"{self.cache_key_}.lock", final / "meta.json"):
            if (final / "meta.json").is_file():
                self._load_folder(final)
                self.cache_hit_ = True
                return self
            partial = cache_dir / f"{self.cache_key_}.partial"
            self._train(images, labels, seed, partial, progress, on_step)
            tmp = cache_dir / f"{self.cache_key_}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            self.pipeline_.save_pretrained(tmp / "pipeline")
            meta = {"cache_key": self.cache_key_, "checkpoint_sha256": self.checkpoint_sha256_,
                    "classes": self.classes_, "data_channels": self.data_channels_, "data_size": self.data_size_,
                    "model_channels": self.model_channels_, "preset": {"name": self.name, **settings},
                    "seed": seed, "train_seconds": self.train_seconds_, "loss_history": self.loss_history_}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
            os.replace(tmp, final)
            shutil.rmtree(partial, ignore_errors=True)
        self.folder_ = final
        return self

    def _train(self, images: np.ndarray, labels: np.ndarray, seed: int, workdir: Path | None, progress: bool,
               on_step: Callable[[int], None] | None) -> None:
        s = self.settings()
        device = resolve_device(self.device, f"generator preset {self.name!r}: device")
        x = self._to_model(torch.from_numpy(images)) * 2 - 1
        with torch.random.fork_rng(devices=[]):  # weight init seeded without touching the caller's global RNG
            torch.manual_seed(seed)
            unet = build_unet(len(self.classes_), self.model_channels_, s["resolution"], s["unet"]).to(device)
        t0 = time.perf_counter()
        ema_unet, losses, trained = train_unet(unet, x, torch.from_numpy(labels), len(self.classes_), s["train"],
                                               seed=seed, device=device, workdir=workdir, progress=progress,
                                               on_step=on_step)
        self.train_seconds_ = time.perf_counter() - t0
        self.loss_history_, self.trained_steps_ = losses, trained
        sampler = make_scheduler(s["sample"]["sampler"], noise_schedule(s["train"]).config)
        self._set_pipeline(ClassConditionalPipeline(ema_unet, sampler))

    def _set_pipeline(self, pipe: ClassConditionalPipeline) -> None:
        pipe.set_sampler(self.settings()["sample"]["sampler"])
        pipe.to(resolve_device(self.device, f"generator preset {self.name!r}: device"))
        pipe.unet.eval()
        if pipe.device.type == "cuda":
            pipe.unet.to(memory_format=torch.channels_last)
        pipe.set_progress_bar_config(disable=True)
        self.pipeline_ = pipe
        self.checkpoint_sha256_ = weights_sha256(pipe.unet)

    def _load_folder(self, folder: Path) -> None:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        self.classes_ = meta["classes"]
        self.data_channels_, self.data_size_ = meta["data_channels"], meta["data_size"]
        self.model_channels_ = meta["model_channels"]
        self.loss_history_, self.train_seconds_ = meta["loss_history"], meta["train_seconds"]
        from diffusers.utils import logging as diffusers_logging

        bars = diffusers_logging.is_progress_bar_enabled()
        diffusers_logging.disable_progress_bar()  # a two-component bar per load is noise beside the stage lines
        try:
            # low_cpu_mem_usage=False: a ~1 M-parameter model needs no accelerate (diffusers warns without it)
            # use_safetensors: a pickled `.bin` planted beside (or instead of) the weights is never read
            pipe = ClassConditionalPipeline.from_pretrained(folder / "pipeline", low_cpu_mem_usage=False,
                                                            use_safetensors=True)
        except Exception as exc:  # a damaged or foreign cache entry: safetensors/JSON parse errors, a refused pickle
            raise DataError(f"{folder / 'pipeline'}: cannot load the cached generator ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); delete '{folder}' to retrain it") from None
        finally:
            if bars:
                diffusers_logging.enable_progress_bar()
        self._set_pipeline(pipe)
        self.folder_ = folder

    @classmethod
    def load(cls, folder: str | Path, **overrides: Any) -> DDPMGenerator:
        """A fitted generator from a cache folder; `overrides` (e.g. `sample`) replace the stored preset's keys."""
        folder = Path(folder)
        if not (folder / "meta.json").is_file():
            raise DataError(f"'{folder}' is not a trained ddpm generator folder (no meta.json)")
        preset = json.loads((folder / "meta.json").read_text(encoding="utf-8"))["preset"]
        gen = cls(**{**preset, **overrides})
        gen._load_folder(folder)
        gen.cache_key_, gen.cache_hit_, gen.trained_steps_ = folder.name, True, 0
        return gen

    # ------------------------------------------------------------------ sample
    def generate_batch(self, class_indices: np.ndarray, seeds: list[int], *, mode: str,
                       exemplars: np.ndarray | None = None, strength: float = 0.5,
                       classifier_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       classifier_scale: float = 0.0, steps: int | None = None,
                       guidance_scale: float | None = None) -> np.ndarray:
        """One image per class index, image k from `torch.Generator().manual_seed(seeds[k])`; N×C×H×W in [0, 1]."""
        self._check_fitted()
        labels = np.asarray(class_indices, dtype=np.int64).reshape(-1)
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {list(MODES)}")
        if len(seeds) != len(labels):
            raise ValueError(f"got {len(seeds)} seeds for {len(labels)} class indices; pass one per image")
        kwargs: dict[str, Any] = {}
        if mode == "exemplar":
            want = (len(labels), self.data_channels_, self.data_size_, self.data_size_)
            if exemplars is None or tuple(exemplars.shape) != want:
                got = None if exemplars is None else tuple(exemplars.shape)
                raise ValueError(f"exemplar mode needs exemplars of shape {want}, got {got}")
            kwargs.update(init_images=self._to_model(torch.as_tensor(exemplars, dtype=torch.float32)),
                          strength=float(strength))
        if mode == "guided":
            if classifier_fn is None:
                raise ValueError("guided mode needs a classifier_fn (images N×C×H×W in [0, 1] → logits)")
            kwargs.update(classifier_fn=lambda x: classifier_fn(self._to_data(x)),
                          classifier_scale=float(classifier_scale))
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        out = self.pipeline_(labels, generator=generators, num_inference_steps=int(steps or self.steps),
                             guidance_scale=float(self.guidance_scale if guidance_scale is None else guidance_scale),
                             output_type="pt", **kwargs).images
        return to_data_batch(out, self.data_channels_, (self.data_size_, self.data_size_))

    # ------------------------------------------------------------------ data ↔ model space
    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Data images (N×C×H×W in [0, 1]) → the generator's channels and resolution."""
        res = self.settings()["resolution"]
        return match_data(x, self.model_channels_, (res, res)).contiguous()

    def _to_data(self, x: torch.Tensor) -> torch.Tensor:
        return match_data(x, self.data_channels_, (self.data_size_, self.data_size_))


def _check_training_data(images: Any, labels: Any, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    if len(classes) < 1:
        raise DataError("classes: the generator needs at least one class")
    images, labels = check_images(np.asarray(images), "generator training images", nonempty=True,
                                  labels=np.asarray(labels, dtype=np.int64).reshape(-1), num_classes=len(classes))
    if images.shape[1] not in (1, 3) or images.shape[2] != images.shape[3]:
        raise DataError(f"generator training images: expected square images with 1 or 3 channels, got "
                        f"C×H×W {images.shape[1:]}")
    return np.ascontiguousarray(images), np.ascontiguousarray(labels)


def cache_key(images: np.ndarray, labels: np.ndarray, classes: list[str], settings: dict[str, Any],
              seed: int) -> str:
    """sha256 of what determines the trained weights: pixels, labels, classes, training preset, seed."""
    h = hashlib.sha256(CACHE_VERSION.encode())
    h.update(json.dumps(list(images.shape)).encode())
    h.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    training = {k: settings[k] for k in ("resolution", "channels", "unet", "train")}
    h.update(json.dumps({"classes": list(classes), "preset": training, "seed": int(seed)}, sort_keys=True).encode())
    return h.hexdigest()


@contextlib.contextmanager
def _training_lock(lock: Path, done_marker: Path, poll_s: float = 2.0):
    """Exclusive right to train one cache key (`rundir.PidLock`); a waiter returns as soon as the holder
    has finished (`done_marker` exists), or takes the lock over when its holder died."""
    held = PidLock(lock)
    while held.try_acquire() is not None:
        if done_marker.is_file():
            yield
            return
        time.sleep(poll_s)
    try:
        yield
    finally:
        held.release()


# ---------------------------------------------------------------------- training loop


def train_unet(unet: UNet2DModel, x: torch.Tensor, y: torch.Tensor, n_classes: int, cfg: dict[str, Any], *,
               seed: int, device: torch.device, workdir: Path | None = None, progress: bool = True,
               on_step: Callable[[int], None] | None = None) -> tuple[UNet2DModel, list[float], int]:
    """Noise-prediction training with label dropout and EMA; returns (EMA UNet, loss per step, steps run now).

    `x` is N×C×R×R in [-1, 1] on the CPU. All randomness comes from one `torch.Generator` seeded
    with `seed`, whose state is checkpointed, so a resumed run repeats the uninterrupted one.
    """
    steps, batch = int(cfg["steps"]), int(cfg["batch_size"])
    sched = noise_schedule(cfg)
    initial = {k: v.detach().clone() for k, v in unet.state_dict().items()}

    def fresh_state() -> tuple[torch.optim.Optimizer, EMAModel, torch.Generator]:
        unet.load_state_dict(initial)
        opt = torch.optim.AdamW(unet.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
        ema = EMAModel(unet.parameters(), decay=float(cfg["ema_decay"]), use_ema_warmup=True, power=2 / 3,
                       model_cls=UNet2DModel, model_config=unet.config)
        return opt, ema, torch.Generator().manual_seed(int(seed))

    opt, ema, gen = fresh_state()
    counts = torch.bincount(y, minlength=n_classes).float()
    draw_weights = counts[y] ** -float(cfg["class_balance"])  # 0: natural frequencies, 1: balanced classes
    null = torch.tensor(n_classes)
    ckpt = workdir / "checkpoint" if workdir is not None else None
    start, losses = 0, []
    if ckpt is not None:
        try:
            start, losses = _load_checkpoint(ckpt, unet, opt, ema, gen)
        except CorruptCheckpoint as exc:
            # The partial state is a cache of this very training: retraining from step 0 gives the same
            # weights (one seeded generator drives it), so a damaged checkpoint costs time, not results.
            warnings.warn(f"{exc}; the partial generator training in '{ckpt.parent}' is discarded and "
                          "restarts from step 0", stacklevel=2)
            shutil.rmtree(ckpt.parent, ignore_errors=True)
            opt, ema, gen = fresh_state()
    use_amp = device.type == "cuda"
    if use_amp:
        unet.to(memory_format=torch.channels_last)
    unet.train()
    bar = tqdm(range(start, steps), desc="training generator", disable=not progress, initial=start, total=steps)
    for step in bar:
        idx = torch.multinomial(draw_weights, batch, replacement=True, generator=gen)
        x0, labels = x[idx], y[idx]
        for dim, key in ((-1, "hflip"), (-2, "vflip")):
            flip = torch.rand(batch, generator=gen) < 0.5
            if cfg["augment"][key]:
                x0 = torch.where(flip[:, None, None, None], x0.flip(dim), x0)
        labels = torch.where(torch.rand(batch, generator=gen) < float(cfg["cfg_dropout"]), null, labels)
        for group in opt.param_groups:
            group["lr"] = float(cfg["lr"]) * min(1.0, (step + 1) / max(1, int(cfg["warmup_steps"])))
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = denoising_loss(unet, sched, x0, labels, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if float(cfg["grad_clip"]) > 0:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), float(cfg["grad_clip"]))
        opt.step()
        ema.step(unet.parameters())
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if ckpt is not None and (step + 1) % int(cfg["checkpoint_every"]) == 0 and step + 1 < steps:
            _save_checkpoint(ckpt, unet, opt, ema, gen, step + 1, losses)
        if on_step is not None:
            on_step(step + 1)
    ema_unet = UNet2DModel.from_config(unet.config).to(device)
    ema.copy_to(ema_unet.parameters())
    return ema_unet.to(memory_format=torch.contiguous_format), losses, steps - start


def noise_schedule(train: dict[str, Any]) -> DDPMScheduler:
    """The training noise schedule; sampling schedulers are built on its config."""
    return DDPMScheduler(num_train_timesteps=int(train["num_train_timesteps"]), beta_schedule=train["beta_schedule"],
                         prediction_type=train["prediction_type"])


def denoising_loss(unet: UNet2DModel, sched: DDPMScheduler, x0: torch.Tensor, labels: torch.Tensor,
                   gen: torch.Generator) -> torch.Tensor:
    """Mean squared error of the model's target (noise, or velocity for v_prediction) at random timesteps.

    v-prediction keeps the x0 estimate finite where the cosine schedule reaches pure noise, which
    few-step samplers starting at the last timestep need (epsilon models there give saturated images).
    """
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=gen)
    target = sched.get_velocity(x0, noise, t) if sched.config.prediction_type == "v_prediction" else noise
    device = next(unet.parameters()).device
    pred = unet(sched.add_noise(x0, noise, t).to(device), t.to(device), class_labels=labels.to(device)).sample
    return F.mse_loss(pred.float(), target.to(device))


def _save_checkpoint(folder: Path, unet: UNet2DModel, opt: torch.optim.Optimizer, ema: EMAModel,
                     gen: torch.Generator, step: int, losses: list[float]) -> None:
    """Everything a resumed run needs, without pickle; replaced atomically (old kept until the new is whole)."""
    tmp, old = folder.with_name("checkpoint.tmp"), folder.with_name("checkpoint.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unet.save_pretrained(tmp / "unet")
    opt_state = opt.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, st in opt_state["state"].items()
               for k, v in st.items() if torch.is_tensor(v)}
    safetensors.torch.save_file(tensors, tmp / "optimizer.safetensors")
    ema_state = ema.state_dict()
    shadow = {f"{i}": p.detach().cpu().contiguous() for i, p in enumerate(ema_state.pop("shadow_params"))}
    shadow["rng"] = gen.get_state()
    safetensors.torch.save_file(shadow, tmp / "ema_rng.safetensors")
    state = {"step": step, "losses": losses, "param_groups": opt_state["param_groups"], "ema": ema_state}
    (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


class CorruptCheckpoint(Exception):
    """A partial training checkpoint that cannot be read back (damaged, replaced, or from other code)."""


def _checked(path: Path, action: Callable[[], Any]) -> Any:
    """`action()`, with any failure turned into a `CorruptCheckpoint` naming `path`."""
    try:
        return action()
    except Exception as exc:  # noqa: BLE001 - safetensors, JSON, shape and key errors all mean "unusable"
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise CorruptCheckpoint(f"{path}: unreadable generator checkpoint ({type(exc).__name__}: {detail})") from None


def _load_checkpoint(folder: Path, unet: UNet2DModel, opt: torch.optim.Optimizer, ema: EMAModel,
                     gen: torch.Generator) -> tuple[int, list[float]]:
    """Restore a partial training. A file that cannot be read or applied is a `CorruptCheckpoint` naming
    it; the caller then restarts from step 0 on fresh state (a failure can leave the objects half-loaded)."""
    if not (folder / "state.json").is_file():
        old = folder.with_name("checkpoint.old")  # a crash between the two renames of _save_checkpoint
        if not (old / "state.json").is_file():
            return 0, []
        folder = old
    files = {"state": folder / "state.json", "unet": folder / "unet" / "diffusion_pytorch_model.safetensors",
             "optimizer": folder / "optimizer.safetensors", "ema": folder / "ema_rng.safetensors"}
    state = _checked(files["state"], lambda: json.loads(files["state"].read_text(encoding="utf-8")))
    device = next(unet.parameters()).device
    weights = _checked(files["unet"], lambda: safetensors.torch.load_file(files["unet"]))
    tensors = _checked(files["optimizer"], lambda: safetensors.torch.load_file(files["optimizer"]))
    shadow = _checked(files["ema"], lambda: safetensors.torch.load_file(files["ema"]))
    _checked(files["unet"], lambda: unet.load_state_dict(weights))

    def optimizer() -> None:
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            i, name = key.split(".", 1)
            per_param.setdefault(int(i), {})[name] = value if name == "step" else value.to(device)
        opt.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})

    def ema_and_rng() -> None:
        gen.set_state(shadow.pop("rng"))
        ema.load_state_dict({**state["ema"], "shadow_params": [shadow[str(i)].to(device) for i in range(len(shadow))]})

    _checked(files["optimizer"], optimizer)
    _checked(files["ema"], ema_and_rng)
    return _checked(files["state"], lambda: (int(state["step"]), [float(v) for v in state["losses"]]))
