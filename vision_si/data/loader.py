"""Training batches: real draws that do not depend on the synthetic images, plus synthetic slots.

`make_train_loader` yields exactly `steps` batches. Each batch is two parts:

1. **Real draws**: `batch_size` rows drawn with replacement from the real images alone, by class
   weights (`sampling`: `natural` = as often as they occur, `balanced` = every class equally,
   `sqrt` = in between). Their rows and augmentation seeds depend only on (seed, step) and on the
   real images, never on the synthetic ones. Two trainings with the same seed and real data, one
   with a synthetic pool and one without, therefore see the same real batches in the same order
   with the same augmentation draws (common random numbers): the pool is the only difference, so
   a paired comparison measures the pool and not a reshuffled batch stream.
2. **Synthetic slots** (only when `extra_images` are given): extra draws appended after the real
   ones, from their own random stream. Mixing bound (DESIGN.md "Mixing"): for class k with n_k
   real and m_k synthetic images, the expected synthetic draws per batch are
   `r_k × min(synthetic_share, m_k / n_k)`, where r_k is the class's expected real draws per batch.
   So a synthetic image is never drawn more often than a real image of its class, and a class never
   gets more than `synthetic_share` synthetic draws per real draw, however large the pool. A class
   with no real images gets no synthetic draws. The number of slots in a batch is the integer part
   of the expected total plus one with the probability of the fraction (so the bound holds in
   expectation also for tiny pools).

Reproducibility without shared state: draws come in chunks of `CHUNK_STEPS` batches, each chunk from
its own `torch.Generator` seeded from (seed, chunk, stream), and every draw gets its own
augmentation seed. A batch depends only on (seed, step): the same with any `num_workers`, and a
resumed run (`start_step`) sees the very batches an uninterrupted one would.

Batches are dicts: `image` (B×C×H×W float32), `label` (B int64), `index` (B int64, row in the
dataset: real samples first, then extra), `synthetic` (B bool); `dataset.ids[index]` gives the
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
SAMPLING = ("natural", "balanced", "sqrt")
_REAL, _SYNTHETIC = 0, 1  # the two random streams

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


def real_class_weights(counts: np.ndarray, sampling: str) -> np.ndarray:
    """Share of the real draws that goes to each class (sums to 1 over classes with images)."""
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
    counts = np.asarray(counts, dtype=float)
    present = counts > 0
    mass = {"natural": counts, "balanced": present.astype(float), "sqrt": np.sqrt(counts)}[sampling]
    return mass / mass.sum() if mass.sum() > 0 else mass


def synthetic_rates(real_counts: np.ndarray, synthetic_counts: np.ndarray, real_share: np.ndarray, *,
                    batch_size: int, synthetic_share: float) -> np.ndarray:
    """Expected synthetic draws per batch for each class (module doc: the mixing bound)."""
    if synthetic_share < 0:
        raise ValueError(f"synthetic_share must be >= 0, got {synthetic_share}")
    n = np.asarray(real_counts, dtype=float)
    m = np.asarray(synthetic_counts, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_real = np.where(n > 0, np.minimum(synthetic_share, m / n), 0.0)
    return batch_size * np.asarray(real_share, dtype=float) * per_real


def _stream_generator(seed: int, chunk: int, stream: int) -> tuple[torch.Generator, np.random.SeedSequence]:
    ss = np.random.SeedSequence([seed, chunk, stream])
    return torch.Generator().manual_seed(int(ss.generate_state(1)[0])), ss


class _StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """`steps - start_step` batches of (row, augmentation seed) pairs; see the module doc."""

    def __init__(self, real_weights: np.ndarray, *, batch_size: int, steps: int, seed: int, start_step: int = 0,
                 synthetic_weights: np.ndarray | None = None, synthetic_per_batch: float = 0.0,
                 synthetic_offset: int = 0):
        self.real_weights = torch.as_tensor(real_weights, dtype=torch.double)
        self.synthetic_weights = (None if synthetic_weights is None or synthetic_per_batch <= 0
                                  else torch.as_tensor(synthetic_weights, dtype=torch.double))
        self.synthetic_per_batch, self.synthetic_offset = float(synthetic_per_batch), synthetic_offset
        self.batch_size, self.steps, self.seed, self.start_step = batch_size, steps, seed, start_step

    def __len__(self) -> int:
        return self.steps - self.start_step

    def _real_chunk(self, c: int, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
        n = n_steps * self.batch_size
        gen, ss = _stream_generator(self.seed, c, _REAL)
        rows = np.fromiter(WeightedRandomSampler(self.real_weights, n, replacement=True, generator=gen),
                           dtype=np.int64, count=n)
        aug = ss.spawn(1)[0].generate_state(n)
        return rows.reshape(n_steps, self.batch_size), aug.reshape(n_steps, self.batch_size)

    def _synthetic_chunk(self, c: int, n_steps: int) -> list[list[tuple[int, int]]]:
        if self.synthetic_weights is None:
            return [[] for _ in range(n_steps)]
        gen, ss = _stream_generator(self.seed, c, _SYNTHETIC)
        whole, frac = divmod(self.synthetic_per_batch, 1.0)
        extra = torch.rand(n_steps, generator=gen).numpy() < frac
        counts = int(whole) + extra.astype(int)
        total = int(counts.sum())
        rows = (np.fromiter(WeightedRandomSampler(self.synthetic_weights, total, replacement=True, generator=gen),
                            dtype=np.int64, count=total) if total else np.zeros(0, np.int64))
        aug = ss.spawn(1)[0].generate_state(max(total, 1))[:total]
        out, i = [], 0
        for n in counts:
            out.append(list(zip((rows[i:i + n] + self.synthetic_offset).tolist(), aug[i:i + n].tolist(), strict=True)))
            i += n
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while step < self.steps:
            c = step // CHUNK_STEPS
            n_steps = min(CHUNK_STEPS, self.steps - c * CHUNK_STEPS)
            rows, seeds = self._real_chunk(c, n_steps)
            synthetic = self._synthetic_chunk(c, n_steps)
            for i in range(step - c * CHUNK_STEPS, n_steps):
                yield list(zip(rows[i].tolist(), seeds[i].tolist(), strict=True)) + synthetic[i]
                step += 1


def _check_images(name: str, images: np.ndarray, labels: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        raise DataError(f"{name}: expected an N×C×H×W array, got shape {getattr(images, 'shape', None)}")
    if len(images) != len(labels):
        raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")


def make_train_loader(images: np.ndarray, labels: np.ndarray, *, batch_size: int, steps: int, seed: int,
                      augment: Augment | None = None, sampling: str = "natural",
                      ids: Sequence[str] | None = None, extra_images: np.ndarray | None = None,
                      extra_labels: np.ndarray | None = None, extra_ids: Sequence[str] | None = None,
                      synthetic_share: float = 1.0, num_workers: int = 0, start_step: int = 0) -> DataLoader:
    """A DataLoader yielding exactly `steps - start_step` batches (module doc).

    `images` are the real training images (`batch_size` real draws per batch), `extra_*` the
    synthetic ones (their slots come on top; ids default to `real:<i>` and `extra:<i>`).
    `start_step` skips the batches a resumed run has already used.
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
        all_images, all_labels, extra_labels = images, labels, np.zeros(0, np.int64)
    real_ids = list(ids) if ids is not None else [f"real:{i}" for i in range(len(labels))]
    syn_ids = list(extra_ids) if extra_ids is not None else [f"extra:{i}" for i in range(n_extra)]
    is_synthetic = np.r_[np.zeros(len(labels), bool), np.ones(n_extra, bool)]
    dataset = ArrayDataset(all_images, all_labels, real_ids + syn_ids, is_synthetic, augment)

    k = int(max(labels.max(), extra_labels.max() if n_extra else 0)) + 1
    real_counts = np.bincount(labels, minlength=k)
    share = real_class_weights(real_counts, sampling)
    real_weights = (share / np.maximum(real_counts, 1))[labels]
    syn_weights, per_batch = None, 0.0
    if n_extra:
        syn_counts = np.bincount(extra_labels, minlength=k)
        rates = synthetic_rates(real_counts, syn_counts, share, batch_size=batch_size, synthetic_share=synthetic_share)
        per_batch = float(rates.sum())
        syn_weights = (rates / np.maximum(syn_counts, 1))[extra_labels]
    sampler = _StepBatchSampler(real_weights, batch_size=batch_size, steps=steps, seed=seed, start_step=start_step,
                                synthetic_weights=syn_weights, synthetic_per_batch=per_batch,
                                synthetic_offset=len(labels))
    # own generator for the workers' base seed, so building the loader leaves the global RNG alone
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed))
