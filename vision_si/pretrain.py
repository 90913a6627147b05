"""The pretrain stage: a self-supervised encoder trained on the user's own images, never on val or test.

The backbone is the classifier's own timm architecture without its head
(`timm.create_model(arch, num_classes=0, in_chans=..., **model_kwargs)`), so a classifier can start
from it (`classifier.pretrained: ssl`, resolved by the loop to the encoder's weights file and loaded by
`vision_si.classifier.model`). The method's pieces come from lightly (the `pretrain` extra, imported
only when an encoder is trained): `simclr` is `SimCLRProjectionHead` + `NTXentLoss`, `vicreg` is
`VICRegProjectionHead` + `VICRegLoss`. Each image gives two views made by albumentations (random
resized crop, flips and 90-degree turns where the data allows them, brightness/contrast, blur or
noise), each view seeded by (seed, draw, view), so a batch depends only on (seed, step).

Inputs. The train split plus the images of `data.unlabelled`. `pretrain_encoder` takes the ids and
sha256 of what it trains on and refuses (`DataError` naming the id) any id or content of the run's
val/test splits; `pretraining_inputs` leaves an unlabelled copy of a val/test image out before
decoding it and reports it. Inputs are de-duplicated by sha256 and put in sha256 order, so the
weights depend on the set of images, not on their order.

Cache. `cache_dir/<key>/` holds `model.safetensors` (the backbone's state dict, timm-compatible, the
safetensors metadata marking it as an encoder) and `encoder.json`. `key` = sha256 of a format
version, the sorted input sha256 list, the pixels in that order (they also depend on the decoding
policy: size, channels, resize, DICOM window), the architecture and its kwargs, the settings that
change the weights, and the seed. A second call with the same inputs loads the entry. While
training, `cache_dir/<key>.partial/checkpoint.safetensors` (weights, head, optimizer, RNG; scalars as
JSON in its header; written atomically, never pickled) is rewritten every `checkpoint_every` steps,
and a call after a crash continues from it to the same weights on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import safetensors
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vision_si.classifier.model import (
    ENCODER_FORMAT,
    _build,
    _check_images,
    encoder_file_metadata,
    normalisation,
    resolve_device,
)
from vision_si.config import PretrainConfig, RunConfig, resolve_path
from vision_si.data.images import load_images
from vision_si.data.loader import _apply_augment
from vision_si.data.sources import load_unlabelled
from vision_si.errors import ConfigError, DataError, RunDirError
from vision_si.rundir import RunLock, atomic_write_bytes, atomic_write_json

CACHE_VERSION = "vision_si-encoder-1"
WEIGHTS_FILE, META_FILE, CHECKPOINT_FILE = "model.safetensors", "encoder.json", "checkpoint.safetensors"
LIGHTLY_INSTALL = "`pip install lightly` (in a checkout: `pip install -e '.[pretrain]'` or `make setup-dev`)"
# settings that do not change the weights stay out of the cache key
_NOT_IN_KEY = ("enabled", "cache_dir", "use_for", "checkpoint_every", "seed")


def require_lightly() -> None:
    """A `ConfigError` with the install hint when lightly is missing (checked before any work)."""
    if importlib.util.find_spec("lightly") is None:
        raise ConfigError(f"pretrain.enabled: the self-supervised pretraining needs lightly, which is not "
                          f"installed: {LIGHTLY_INSTALL}")


# ---------------------------------------------------------------------- the encoder


@dataclass
class Encoder:
    """A pretrained backbone (eval mode) with its `encoder.json`; `embed` gives label-free features."""

    model: torch.nn.Module
    meta: dict[str, Any]
    path: Path
    cache_hit: bool = False
    trained_steps: int = 0  # optimizer steps run by this call (0 when loaded)

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def dim(self) -> int:
        return int(self.model.num_features)

    def embed(self, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        """N×D float32 pooled features of N×C×H×W images in [0, 1], L2-normalised; batched, no gradients."""
        c = int(self.meta["in_chans"])
        images, _ = _check_images("images to embed", images)
        if images.shape[1] != c:
            raise DataError(f"images to embed have {images.shape[1]} channel(s); the encoder takes {c}")
        device = next(self.model.parameters()).device
        mean = torch.tensor(self.meta["mean"], device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.meta["std"], device=device).view(1, -1, 1, 1)
        out = np.zeros((len(images), self.dim), np.float32)
        self.model.eval()
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                x = _resize(torch.from_numpy(images[i:i + batch_size]), int(self.meta["image_size"])).to(device)
                out[i:i + batch_size] = F.normalize(self.model((x - mean) / std).float(), dim=1).cpu().numpy()
        return out


def load_encoder(path: str | Path, device: str | torch.device = "auto") -> Encoder:
    """An encoder folder (or a run's `pretrain/` folder, whose `encoder.json` points at the cache entry).

    The weights' sha256 must match `encoder.json`; nothing is unpickled.
    """
    folder = Path(path)
    meta = _read_meta(folder / META_FILE)
    if not (folder / WEIGHTS_FILE).is_file() and "path" in meta:  # a run's pointer to the cache entry
        folder = Path(meta["path"])
        meta = _read_meta(folder / META_FILE)
    data = _read_bytes(folder / WEIGHTS_FILE)
    if hashlib.sha256(data).hexdigest() != meta.get("weights_sha256"):
        raise DataError(f"{folder / WEIGHTS_FILE}: sha256 differs from {META_FILE}; the file was changed or "
                        f"truncated (delete '{folder}' to pretrain again)")
    try:
        model = timm.create_model(meta["arch"], pretrained=False, **meta["create_kwargs"])
        model.load_state_dict(safetensors.torch.load(data), strict=True)
    except (KeyError, RuntimeError, TypeError) as exc:
        raise DataError(f"{folder / WEIGHTS_FILE}: not an encoder of {meta.get('arch')!r}: {exc}") from None
    model.to(resolve_device(device) if isinstance(device, str) else device).eval()
    return Encoder(model=model, meta=meta, path=folder)


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no pretrained encoder here") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not a readable encoder description ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != ENCODER_FORMAT and "path" not in meta:
        raise DataError(f"{path}: not a vision_si encoder description (format {ENCODER_FORMAT})")
    return meta


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the encoder weights ({exc.strerror})") from None


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


# ---------------------------------------------------------------------- training


def pretrain_encoder(cfg: PretrainConfig, images: np.ndarray, ids: Sequence[str], sha256: Sequence[str], *,
                     arch: str, model_kwargs: Mapping[str, Any] | None = None, seed: int = 0,
                     forbidden_ids: Collection[str] = (), forbidden_sha256: Collection[str] = (),
                     progress: bool = True, device: str = "auto",
                     on_step: Callable[[int, float], None] | None = None) -> Encoder:
    """Train (or load from `cfg.cache_dir`) a self-supervised encoder on `images` (N×C×H×W in [0, 1]).

    `ids`/`sha256` name each image; one in `forbidden_ids`/`forbidden_sha256` (the run's val and test)
    is a `DataError`. `cfg.flips` None means no flips. `on_step(step, loss)` runs after every step
    (a test interrupts training from it).
    """
    images, _ = _check_images("pretraining images", images)
    if not len(ids) == len(sha256) == len(images):
        raise DataError(f"{len(images)} pretraining images need as many ids and sha256, got {len(ids)} and {len(sha256)}")
    bad_ids, bad_sha = set(forbidden_ids), set(forbidden_sha256)
    for i, h in zip(ids, sha256, strict=True):
        if i in bad_ids:
            raise DataError(f"pretraining image '{i}' is in the run's val/test split; the encoder never sees val or test")
        if h in bad_sha:
            raise DataError(f"pretraining image '{i}' has the same content (sha256 {h[:12]}…) as a val/test image; "
                            "the encoder never sees val or test")
    first = {h: n for n, h in reversed(list(enumerate(sha256)))}  # one copy of each image, in sha256 order
    order = [first[h] for h in sorted(first)]
    if len(order) < 2:
        raise DataError(f"pretraining needs at least 2 distinct images, got {len(order)}")
    size = cfg.image_size or int(images.shape[2])
    x = _resize(torch.from_numpy(images[order]), size)
    model_kwargs = dict(model_kwargs or {})
    key = cache_key(cfg, [sha256[n] for n in order], x, arch=arch, model_kwargs=model_kwargs, seed=seed)
    cache = Path(cfg.cache_dir).expanduser().resolve()
    final = cache / key
    if (final / META_FILE).is_file():
        enc = load_encoder(final, device)
        enc.cache_hit = True
        return enc
    partial = cache / f"{key}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    with _cache_lock(partial):
        if (final / META_FILE).is_file():  # another process finished it while this one waited
            enc = load_encoder(final, device)
            enc.cache_hit = True
            return enc
        t0 = time.perf_counter()
        backbone, meta, trained = _train(cfg, x, arch=arch, model_kwargs=model_kwargs, seed=seed,
                                         device=resolve_device(device), checkpoint=partial / CHECKPOINT_FILE,
                                         progress=progress, on_step=on_step)
        meta.update(cache_key=key, n_inputs=len(order), seconds=time.perf_counter() - t0, seed=seed,
                    inputs_sha256=[sha256[n] for n in order])
        _save_encoder(final, backbone, meta)
        shutil.rmtree(partial, ignore_errors=True)
    enc = load_encoder(final, device)
    enc.trained_steps = trained
    return enc


def cache_key(cfg: PretrainConfig, sorted_sha256: Sequence[str], pixels: torch.Tensor, *, arch: str,
              model_kwargs: Mapping[str, Any], seed: int) -> str:
    """sha256 of what decides the weights (module doc); `pixels` in the order of `sorted_sha256`."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IN_KEY}
    settings["flips"] = bool(cfg.flips)
    h = hashlib.sha256(CACHE_VERSION.encode())
    h.update(json.dumps({"inputs": list(sorted_sha256), "arch": arch, "model_kwargs": dict(model_kwargs),
                         "settings": settings, "seed": int(seed), "shape": list(pixels.shape)},
                        sort_keys=True, default=str).encode())
    h.update(pixels.contiguous().numpy().tobytes())
    return h.hexdigest()


def n_steps(cfg: PretrainConfig, n_images: int) -> int:
    """Optimizer steps for `cfg.epochs` passes over `n_images` (at least one)."""
    return max(1, math.ceil(cfg.epochs * n_images / min(cfg.batch_size, n_images)))


def view_augmentation(cfg: PretrainConfig, size: int) -> A.Compose:
    """The two-view pipeline (float32 H×W×C in [0, 1] in and out); seeded per draw by the caller."""
    return A.Compose([
        A.RandomResizedCrop(size=(size, size), scale=(cfg.crop_min_scale, 1.0), ratio=(0.75, 4 / 3), p=1.0),
        *([A.SquareSymmetry(p=1.0)] if cfg.flips else []),
        A.RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.3, p=0.8),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.1, 1.0)),
                 A.GaussNoise(std_range=(0.02, 0.08))], p=0.5),
    ], seed=0)


def batch_rows(seed: int, step: int, n_images: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and per-view augmentation seeds (B×2) of batch `step`: epochs are seeded permutations, read in
    order, so a batch depends only on (seed, step) and every image is seen once per epoch."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    rows = np.empty(batch_size, np.int64)
    for epoch in np.unique(positions // n_images):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n_images)
        at = positions // n_images == epoch
        rows[at] = perm[positions[at] % n_images]
    seeds = np.stack([np.random.SeedSequence([seed, int(p), 7]).generate_state(2) for p in positions])
    return rows, seeds


def _method(cfg: PretrainConfig, dim: int) -> tuple[torch.nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """lightly's projection head and loss for `cfg.method`."""
    require_lightly()
    if cfg.method == "simclr":
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        return SimCLRProjectionHead(input_dim=dim, hidden_dim=max(dim, 128), output_dim=128), \
            NTXentLoss(temperature=cfg.temperature)
    if cfg.method == "vicreg":
        from lightly.loss import VICRegLoss
        from lightly.models.modules.heads import VICRegProjectionHead

        width = max(2 * dim, 256)
        return VICRegProjectionHead(input_dim=dim, hidden_dim=width, output_dim=width, num_layers=2), VICRegLoss()
    raise ConfigError(f"pretrain.method: {cfg.method!r} is not one of simclr, vicreg")


def _train(cfg: PretrainConfig, x: torch.Tensor, *, arch: str, model_kwargs: dict[str, Any], seed: int,
           device: torch.device, checkpoint: Path, progress: bool,
           on_step: Callable[[int, float], None] | None) -> tuple[torch.nn.Module, dict[str, Any], int]:
    """The training loop; returns (backbone, its encoder.json fields, steps run by this call)."""
    n, c, size = int(x.shape[0]), int(x.shape[1]), int(x.shape[2])
    batch, steps = min(cfg.batch_size, n), n_steps(cfg, n)
    warmup = max(1, steps // 20)
    images = x.numpy()
    with _deterministic(device), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            backbone, create_kwargs = _build(arch, {"num_classes": 0, "in_chans": c, **model_kwargs}, size,
                                             pretrained=False)
        except RuntimeError as exc:
            raise ConfigError(f"classifier.arch: cannot build {arch!r} as an encoder: {exc}") from None
        head, criterion = _method(cfg, int(backbone.num_features))
        mean, std = normalisation(backbone, c)
        backbone.to(device)
        head.to(device)
        mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
        opt = torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
            1 + math.cos(math.pi * max(0, s - warmup) / max(1, steps - warmup))))
        start, losses = _load_checkpoint(checkpoint, backbone, head, opt, sched)
        views = view_augmentation(cfg, size)
        backbone.train()
        head.train()
        bar = tqdm(total=steps, initial=start, desc=f"pretrain {arch} ({cfg.method})", unit="step", disable=not progress)
        for step in range(start, steps):
            rows, seeds = batch_rows(seed, step, n, batch)
            v = [np.stack([_apply_augment(views, images[r], int(s[k])) for r, s in zip(rows, seeds, strict=True)])
                 for k in (0, 1)]
            z = head(backbone((torch.from_numpy(np.concatenate(v)).to(device) - mean_t) / std_t))
            loss = criterion(z[:batch], z[batch:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                _save_checkpoint(checkpoint, step + 1, losses, backbone, head, opt, sched)
            if on_step is not None:
                on_step(step + 1, losses[-1])
        bar.close()
    backbone.eval()
    meta = {"format": ENCODER_FORMAT, "arch": arch, "in_chans": c, "image_size": size, "mean": mean, "std": std,
            "model_kwargs": model_kwargs, "create_kwargs": create_kwargs, "num_features": int(backbone.num_features),
            "method": cfg.method, "settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("enabled",)},
            "steps": steps, "batch_size": batch, "losses": losses, "device": str(device),
            "versions": {"torch": torch.__version__, "timm": timm.__version__, "lightly": _version("lightly")}}
    return backbone, meta, steps - start


def _version(module: str) -> str | None:
    with contextlib.suppress(Exception):
        return __import__(module).__version__
    return None


@contextlib.contextmanager
def _deterministic(device: torch.device):
    """Deterministic kernels while training (warn-only off CPU), restoring the caller's setting after."""
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)


@contextlib.contextmanager
def _cache_lock(partial: Path):
    try:
        lock = RunLock(partial).acquire()
    except RunDirError as exc:
        raise RunDirError(f"encoder cache entry '{partial}' is being trained by another process ({exc}); "
                          "wait for it, then run again to load its result") from None
    try:
        yield
    finally:
        lock.release()


def _cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def _save_encoder(final: Path, backbone: torch.nn.Module, meta: dict[str, Any]) -> None:
    """`model.safetensors` + `encoder.json` in a temporary folder renamed to the cache entry when whole."""
    data = safetensors.torch.save(_cpu(backbone), metadata=encoder_file_metadata(meta["arch"], meta["in_chans"]))
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_write_bytes(tmp / WEIGHTS_FILE, data)
    atomic_write_json(tmp / META_FILE, {**meta, "weights_sha256": hashlib.sha256(data).hexdigest()})
    os.replace(tmp, final)


def _save_checkpoint(path: Path, step: int, losses: list[float], backbone: torch.nn.Module, head: torch.nn.Module,
                     opt: torch.optim.Optimizer, sched: Any) -> None:
    tensors = {**{f"backbone.{k}": v for k, v in _cpu(backbone).items()},
               **{f"head.{k}": v for k, v in _cpu(head).items()}, "rng.cpu": torch.get_rng_state()}
    state = opt.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{name}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    info = {"step": step, "losses": losses, "param_groups": state["param_groups"], "scalars": scalars,
            "scheduler": sched.state_dict()}
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata={"vision_si_pretrain": json.dumps(info)}))


def _load_checkpoint(path: Path, backbone: torch.nn.Module, head: torch.nn.Module, opt: torch.optim.Optimizer,
                     sched: Any) -> tuple[int, list[float]]:
    """Restore the state of an interrupted run (0 and no losses when there is none)."""
    if not path.is_file():
        return 0, []
    with safetensors.safe_open(str(path), framework="pt") as fh:
        info = json.loads((fh.metadata() or {})["vision_si_pretrain"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    device = next(backbone.parameters()).device
    backbone.load_state_dict(_prefixed(tensors, "backbone."))
    head.load_state_dict(_prefixed(tensors, "head."))
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in _prefixed(tensors, "optim.").items():
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = value if name == "step" else value.to(device)
    for pid, values in info["scalars"].items():
        per_param.setdefault(int(pid), {}).update(values)
    groups = [{**g, "betas": tuple(g["betas"])} for g in info["param_groups"]]
    opt.load_state_dict({"state": per_param, "param_groups": groups})
    sched.load_state_dict(info["scheduler"])
    torch.set_rng_state(tensors["rng.cpu"])
    return int(info["step"]), list(info["losses"])


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------- the run's stage


@dataclass
class PretrainInputs:
    """What a run pretrains on: its train split and its unlabelled images, never val or test."""

    images: np.ndarray
    ids: list[str]
    sha256: list[str]
    forbidden_ids: set[str]
    forbidden_sha256: set[str]
    n_train: int
    n_unlabelled: int
    excluded: list[dict[str, str]] = field(default_factory=list)  # unlabelled copies of val/test images
    skipped: list[dict[str, str]] = field(default_factory=list)  # bad unlabelled images (on_bad_image: skip)


def pretraining_inputs(cfg: RunConfig, table: Any, splits: np.ndarray, *, channels: int,
                       train_images: np.ndarray | None = None, progress: bool = False) -> PretrainInputs:
    """The train split of `table` (its pixels as `train_images` when already loaded) and the images of
    `data.unlabelled`; val/test pixels are never loaded, and an unlabelled copy of one is left out."""
    splits = np.asarray(splits)
    train = np.flatnonzero(splits == "train")
    held = np.flatnonzero(np.isin(splits, ["val", "test"]))
    forbidden_ids = {table.ids[i] for i in held}
    forbidden_sha = {table.sha256[i] for i in held}
    data_cfg = dataclasses.replace(cfg.data, channels=channels)
    images = train_images if train_images is not None else load_images(table, train, data_cfg)
    ids, sha = [table.ids[i] for i in train], [table.sha256[i] for i in train]
    n_unlabelled, excluded, skipped = 0, [], []
    if cfg.data.unlabelled:
        folder = resolve_path(cfg.data.unlabelled)
        extra, excluded = load_unlabelled(folder, alpha=cfg.data.alpha, on_bad_image=cfg.data.on_bad_image,
                                          progress=progress, dicom=cfg.data.dicom, exclude_sha256=forbidden_sha)
        skipped = list(extra.skipped)
        if len(extra):
            images = np.concatenate([images, load_images(extra, np.arange(len(extra)), data_cfg)])
            ids += extra.ids
            sha += extra.sha256
            n_unlabelled = len(extra)
    return PretrainInputs(images=images, ids=ids, sha256=sha, forbidden_ids=forbidden_ids,
                          forbidden_sha256=forbidden_sha, n_train=len(train), n_unlabelled=n_unlabelled,
                          excluded=excluded, skipped=skipped)


def run_pretrain(cfg: RunConfig, table: Any, splits: np.ndarray, *, channels: int, out_dir: Path,
                 train_images: np.ndarray | None = None, progress: bool = True,
                 echo: Callable[[str], None] = print,
                 on_step: Callable[[int, float], None] | None = None) -> Encoder:
    """The loop's stage: train or load the run's encoder and write `out_dir/encoder.json` pointing at it."""
    require_lightly()
    inputs = pretraining_inputs(cfg, table, splits, channels=channels, train_images=train_images, progress=progress)
    if inputs.excluded:
        echo(f"pretrain: {len(inputs.excluded)} unlabelled image(s) left out, copies of val/test images: "
             + ", ".join(e["id"] for e in inputs.excluded[:5]) + (" ..." if len(inputs.excluded) > 5 else ""))
    pcfg = cfg.pretrain
    if pcfg.flips is None:  # the data card's augmentation says whether orientation carries meaning
        pcfg = dataclasses.replace(pcfg, flips=cfg.data.augment in ("standard", "strong"))
    enc = pretrain_encoder(pcfg, inputs.images, inputs.ids, inputs.sha256, arch=cfg.classifier.arch,
                           model_kwargs=cfg.classifier.model_kwargs, seed=pretrain_seed(cfg),
                           forbidden_ids=inputs.forbidden_ids, forbidden_sha256=inputs.forbidden_sha256,
                           progress=progress, device=cfg.classifier.device, on_step=on_step)
    echo(f"pretrain: encoder {enc.path} ({'loaded from the cache' if enc.cache_hit else f'{enc.trained_steps} steps'}"
         f", {enc.meta['n_inputs']} images: {inputs.n_train} train, {inputs.n_unlabelled} unlabelled)")
    atomic_write_json(out_dir / META_FILE, {
        "path": str(enc.path), "cache_key": enc.meta["cache_key"], "weights_sha256": enc.meta["weights_sha256"],
        "arch": enc.meta["arch"], "method": enc.meta["method"], "cache_hit": enc.cache_hit,
        "n_inputs": enc.meta["n_inputs"], "n_train": inputs.n_train, "n_unlabelled": inputs.n_unlabelled,
        "excluded_eval_copies": inputs.excluded, "skipped_unlabelled": inputs.skipped})
    return enc


def pretrain_seed(cfg: RunConfig) -> int:
    return cfg.seed if cfg.pretrain.seed is None else cfg.pretrain.seed


def encoder_available(stage_dir: Path) -> bool:
    """Whether a run's complete `pretrain/` folder still points at an existing cache entry."""
    try:
        target = Path(json.loads((stage_dir / META_FILE).read_text(encoding="utf-8"))["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (target / META_FILE).is_file() and (target / WEIGHTS_FILE).is_file()


def classifier_start(cfg: RunConfig, encoder: Encoder | None) -> str:
    """What `classifier.pretrained` means for this run: the encoder's weights file for `ssl`, and for
    `none` when the encoder is for the classifier (`pretrain.use_for`); weights of the user's (`hub`, a
    file) stay the first choice."""
    start = cfg.classifier.pretrained
    if encoder is None or "classifier" not in cfg.pretrain.use_for or start not in ("ssl", "none"):
        return start
    return str(encoder.weights_file)


def label_free_embeddings(encoder: Encoder, images: Mapping[str, np.ndarray], *,
                          batch_size: int = 256) -> dict[str, np.ndarray]:
    """The encoder's L2-normalised embeddings of each named image set (e.g. the run's train and val
    splits): a view of the images that does not depend on the classifier being judged."""
    return {name: encoder.embed(x, batch_size=batch_size) for name, x in images.items()}
