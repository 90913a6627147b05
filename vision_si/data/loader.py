"""Training batches: a Dataset over arrays and a sampler with a fixed step budget and bounded mixing.

`make_train_loader` yields exactly `steps` batches, drawn with replacement by torch's
`WeightedRandomSampler` from one pool of real plus extra (synthetic) samples.

Mixing policy (DESIGN.md "Mixing"). For class k with n_k real and m_k synthetic samples:

- every real sample has weight 1;
- the synthetic samples of class k share a total weight of min(m_k, synthetic_share × n_k), so
  each has weight min(1, synthetic_share × n_k / m_k). A few synthetic images are drawn as often as
  a real one; many are capped, so that the expected synthetic draws of a class are at most
  `synthetic_share` × its expected real draws, whatever the number of synthetic images;
- a class with synthetic but no real samples gets no synthetic draws (its bound is 0);
- `balanced=True` then rescales every class present in the real data to the same total mass, so
  classes are drawn equally; the real/synthetic split inside a class is unchanged.

Reproducibility without shared state: the draws come in chunks of `CHUNK_STEPS` batches, each chunk
from its own `torch.Generator` seeded from (seed, chunk), and every draw gets its own augmentation
seed from (seed, draw number). A batch therefore depends only on (seed, step): the same with any
`num_workers`, and a resumed run (`start_step`) sees the very batches an uninterrupted one would.

Batches are dicts: `image` (B×C×H×W float32), `label` (B int64), `index` (B int64, row in the
dataset, real samples first, then extra), `synthetic` (B bool); `dataset.ids[index]` gives the
provenance id of each sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler

from vision_si.errors import DataError

CHUNK_STEPS = 256  # batches drawn per generator; bounds memory for long budgets

Augment = Callable[..., Any]


def _apply_augment(augment: Augment, image_chw: np.ndarray, seed: int) -> np.ndarray:
    """One augmented copy of a C×H×W image, seeded by `seed`.

    `augment` is an albumentations transform (anything with `set_random_seed`, input and output
    float32 H×W×C in [0, 1]) or a plain callable `fn(image_hwc, seed) -> image_hwc`.
    """
    hwc = np.ascontiguousarray(image_chw.transpose(1, 2, 0))
    if hasattr(augment, "set_random_seed"):
        augment.set_random_seed(int(seed))
        out = augment(image=hwc)["image"]
    else:
        out = augment(hwc, int(seed))
    out = np.asarray(out, dtype=np.float32)
    if out.ndim == 2:  # some transforms drop a single channel axis
        out = out[:, :, None]
    if out.shape != hwc.shape:
        raise ValueError(f"augmentation changed the image shape from {hwc.shape} to {out.shape}")
    return np.ascontiguousarray(out.transpose(2, 0, 1))


class ArrayDataset(Dataset):
    """Images N×C×H×W float32 in [0, 1] with labels, ids and a synthetic flag per sample.

    Indexed by an int (no augmentation) or by a `(row, augmentation_seed)` pair, which is what the
    sampler of `make_train_loader` hands out.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, ids: Sequence[str] | None = None,
                 is_synthetic: np.ndarray | None = None, augment: Augment | None = None):
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.ids = list(ids) if ids is not None else [f"sample:{i}" for i in range(len(self.labels))]
        self.is_synthetic = (np.zeros(len(self.labels), dtype=bool) if is_synthetic is None
                             else np.asarray(is_synthetic, dtype=bool))
        self.augment = augment
        if not (len(images) == len(self.labels) == len(self.ids) == len(self.is_synthetic)):
            raise DataError(f"dataset arrays differ in length: images {len(images)}, labels "
                            f"{len(self.labels)}, ids {len(self.ids)}, is_synthetic {len(self.is_synthetic)}")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        row, seed = key if isinstance(key, tuple) else (key, None)
        image = np.asarray(self.images[row], dtype=np.float32)
        if self.augment is not None and seed is not None:
            image = _apply_augment(self.augment, image, seed)
        return {"image": torch.from_numpy(np.ascontiguousarray(image)), "label": int(self.labels[row]),
                "index": int(row), "synthetic": bool(self.is_synthetic[row])}


def sampling_weights(labels: np.ndarray, is_synthetic: np.ndarray, *, balanced: bool,
                     synthetic_share: float) -> np.ndarray:
    """Per-sample draw weights implementing the mixing policy of the module doc."""
    labels = np.asarray(labels, dtype=np.int64)
    is_synthetic = np.asarray(is_synthetic, dtype=bool)
    if synthetic_share < 0:
        raise ValueError(f"synthetic_share must be >= 0, got {synthetic_share}")
    k = int(labels.max()) + 1 if len(labels) else 0
    n_real = np.bincount(labels[~is_synthetic], minlength=k).astype(float)
    n_syn = np.bincount(labels[is_synthetic], minlength=k).astype(float)
    syn_mass = np.minimum(n_syn, synthetic_share * n_real)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_syn = np.where(n_syn > 0, syn_mass / n_syn, 0.0)
    weights = np.where(is_synthetic, per_syn[labels], 1.0)
    if balanced:
        class_mass = n_real + syn_mass
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(class_mass > 0, 1.0 / class_mass, 0.0)
        weights = weights * scale[labels]
    return weights


class _StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """`steps - start_step` batches of (row, augmentation seed) pairs; see the module doc."""

    def __init__(self, weights: np.ndarray, *, batch_size: int, steps: int, seed: int, start_step: int = 0):
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.batch_size, self.steps, self.seed, self.start_step = batch_size, steps, seed, start_step

    def __len__(self) -> int:
        return self.steps - self.start_step

    def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        n_steps = min(CHUNK_STEPS, self.steps - c * CHUNK_STEPS)
        n = n_steps * self.batch_size
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, c]).generate_state(1)[0]))
        rows = np.fromiter(WeightedRandomSampler(self.weights, n, replacement=True, generator=gen),
                           dtype=np.int64, count=n)
        aug_seeds = np.random.SeedSequence([self.seed, c, 1]).generate_state(n)
        return rows.reshape(n_steps, self.batch_size), aug_seeds.reshape(n_steps, self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while step < self.steps:
            c = step // CHUNK_STEPS
            rows, seeds = self._chunk(c)
            for i in range(step - c * CHUNK_STEPS, len(rows)):
                yield list(zip(rows[i].tolist(), seeds[i].tolist(), strict=True))
                step += 1


def _check_images(name: str, images: np.ndarray, labels: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        raise DataError(f"{name}: expected an N×C×H×W array, got shape {getattr(images, 'shape', None)}")
    if len(images) != len(labels):
        raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")


def make_train_loader(images: np.ndarray, labels: np.ndarray, *, batch_size: int, steps: int, seed: int,
                      augment: Augment | None = None, balanced: bool = False,
                      ids: Sequence[str] | None = None, extra_images: np.ndarray | None = None,
                      extra_labels: np.ndarray | None = None, extra_ids: Sequence[str] | None = None,
                      synthetic_share: float = 1.0, num_workers: int = 0, start_step: int = 0) -> DataLoader:
    """A DataLoader yielding exactly `steps - start_step` batches of `batch_size` (module doc).

    `images` are the real training images, `extra_*` the synthetic ones (ids default to
    `real:<i>` and `extra:<i>`). `start_step` skips the batches a resumed run has already used.
    """
    labels = np.asarray(labels, dtype=np.int64)
    _check_images("images", images, labels)
    if batch_size < 1 or steps < 1 or not 0 <= start_step <= steps:
        raise ValueError(f"need batch_size >= 1, steps >= 1 and 0 <= start_step <= steps; got "
                         f"batch_size={batch_size}, steps={steps}, start_step={start_step}")
    if len(labels) == 0:
        raise DataError("no training images")
    n_extra = 0 if extra_images is None else len(extra_images)
    if n_extra:
        if extra_labels is None:
            raise DataError("extra_images given without extra_labels")
        extra_labels = np.asarray(extra_labels, dtype=np.int64)
        _check_images("extra_images", extra_images, extra_labels)
        if extra_images.shape[1:] != images.shape[1:]:
            raise DataError(f"extra_images have shape {extra_images.shape[1:]} per image, the real "
                            f"images {images.shape[1:]}")
        if extra_ids is not None and len(extra_ids) != n_extra:
            raise DataError(f"{n_extra} extra images but {len(extra_ids)} extra ids")
        all_images = np.concatenate([images, extra_images])
        all_labels = np.concatenate([labels, extra_labels])
    else:
        all_images, all_labels = images, labels
    real_ids = list(ids) if ids is not None else [f"real:{i}" for i in range(len(labels))]
    syn_ids = list(extra_ids) if extra_ids is not None else [f"extra:{i}" for i in range(n_extra)]
    is_synthetic = np.r_[np.zeros(len(labels), bool), np.ones(n_extra, bool)]
    dataset = ArrayDataset(all_images, all_labels, real_ids + syn_ids, is_synthetic, augment)
    weights = sampling_weights(all_labels, is_synthetic, balanced=balanced, synthetic_share=synthetic_share)
    sampler = _StepBatchSampler(weights, batch_size=batch_size, steps=steps, seed=seed, start_step=start_step)
    # own generator for the workers' base seed, so building the loader leaves the global RNG alone
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed))
