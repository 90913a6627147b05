"""The training loader: step budget, balanced sampling, bounded synthetic share, reproducible augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vision_si.data.augment import build_augmentation
from vision_si.data.loader import make_train_loader, real_class_weights, synthetic_rates
from vision_si.errors import DataError


def _data(counts: list[int], size: int = 8, channels: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, k) for k, n in enumerate(counts)]).astype(np.int64)
    images = rng.random((len(labels), channels, size, size), dtype=np.float32)
    return images, labels


def _labels_and_flags(loader) -> tuple[np.ndarray, np.ndarray, int]:
    labels, flags, n_batches = [], [], 0
    for batch in loader:
        labels.append(batch["label"].numpy())
        flags.append(batch["synthetic"].numpy())
        n_batches += 1
    return np.concatenate(labels), np.concatenate(flags), n_batches


@pytest.mark.parametrize("steps", [1, 7, 300])
def test_yields_exactly_steps_batches_of_batch_size(steps):
    images, labels = _data([5, 3])  # fewer images than one batch: drawn with replacement
    loader = make_train_loader(images, labels, batch_size=16, steps=steps, seed=0)
    sizes = [len(b["label"]) for b in loader]
    assert len(sizes) == steps == len(loader)
    assert set(sizes) == {16}


def test_balanced_sampling_draws_classes_equally():
    images, labels = _data([200, 20, 5])
    loader = make_train_loader(images, labels, batch_size=64, steps=150, seed=1, sampling="balanced")
    drawn, _, _ = _labels_and_flags(loader)
    share = np.bincount(drawn, minlength=3) / len(drawn)
    np.testing.assert_allclose(share, 1 / 3, atol=0.02)
    natural, _, _ = _labels_and_flags(make_train_loader(images, labels, batch_size=64, steps=150, seed=1))
    np.testing.assert_allclose(np.bincount(natural, minlength=3) / len(natural), [200 / 225, 20 / 225, 5 / 225],
                               atol=0.02)


@pytest.mark.parametrize("sampling", ["natural", "balanced"])
@pytest.mark.parametrize("share", [0.25, 1.0])
def test_synthetic_draws_per_class_stay_within_the_share_of_real_draws(sampling, share):
    # class 0: 100 real and 1000 synthetic (must be capped); class 1: 10 real, 2 synthetic (below the cap);
    # class 2: no synthetic; class 3: synthetic only (no real draws, so no synthetic draws either)
    images, labels = _data([100, 10, 30])
    extra_images, extra_labels = _data([1000, 2, 0, 50], seed=1)
    loader = make_train_loader(images, labels, batch_size=128, steps=200, seed=2, sampling=sampling,
                               extra_images=extra_images, extra_labels=extra_labels, synthetic_share=share)
    drawn, synthetic, _ = _labels_and_flags(loader)
    real = np.bincount(drawn[~synthetic], minlength=4)
    syn = np.bincount(drawn[synthetic], minlength=4)
    assert syn[3] == 0 and real[3] == 0 and syn[2] == 0
    # the capped class sits at the bound, within sampling noise (25,600 draws in all)
    assert syn[0] / real[0] == pytest.approx(share, rel=0.08)
    assert syn[0] <= share * real[0] * 1.08
    # below the cap a synthetic image is drawn as often as a real one of its class: 2 per 10 real
    assert syn[1] / real[1] == pytest.approx(min(share, 0.2), rel=0.35)
    # the real draws are exactly batch_size per batch and keep their class weights: synthetic slots come on top
    assert real.sum() == 128 * 200
    if sampling == "balanced":
        np.testing.assert_allclose(real[:3] / real.sum(), 1 / 3, atol=0.02)


def test_synthetic_rate_bound_holds_exactly_in_expectation():
    rng = np.random.default_rng(0)
    real_counts, syn_counts = rng.integers(0, 50, 5), rng.integers(0, 80, 5)
    for share in (0.0, 0.3, 1.0, 3.0):
        for sampling in ("natural", "balanced", "sqrt"):
            real_share = real_class_weights(real_counts, sampling)
            rates = synthetic_rates(real_counts, syn_counts, real_share, batch_size=32, synthetic_share=share)
            real_draws = 32 * real_share
            assert np.all(rates <= share * real_draws + 1e-12)  # at most `share` synthetic per real draw
            with np.errstate(divide="ignore", invalid="ignore"):  # a synthetic image never out-draws a real one
                per_syn = np.where(syn_counts > 0, rates / np.maximum(syn_counts, 1), 0)
                per_real = np.where(real_counts > 0, real_draws / np.maximum(real_counts, 1), 0)
            assert np.all(per_syn <= per_real + 1e-12)


def test_both_sides_of_a_paired_comparison_draw_identical_real_batches():
    """Adding a synthetic pool changes nothing about the real draws: same ids, same augmented pixels."""
    images, labels = _data([40, 6, 3], size=16)
    extra_images, extra_labels = _data([5, 30, 10], size=16, seed=3)
    ids = [f"real-{i}" for i in range(len(labels))]
    aug = build_augmentation("standard", channels=1, seed=0)

    def real_part(**extra):
        loader = make_train_loader(images, labels, batch_size=8, steps=300, seed=4, augment=aug, ids=ids,
                                   sampling="balanced", synthetic_share=1.0, **extra)
        out = []
        for b in loader:
            real = ~b["synthetic"]
            out.append(([loader.dataset.ids[i] for i in b["index"][real].tolist()], b["image"][real].clone(),
                        int(b["synthetic"].sum())))
        return out

    without = real_part()
    with_pool = real_part(extra_images=extra_images, extra_labels=extra_labels,
                          extra_ids=[f"syn-{i}" for i in range(len(extra_labels))])
    assert len(without) == len(with_pool) == 300
    for (ids_a, x_a, n_a), (ids_b, x_b, _) in zip(without, with_pool, strict=True):
        assert ids_a == ids_b and len(ids_a) == 8
        assert torch.equal(x_a, x_b)
        assert n_a == 0
    assert sum(n for *_, n in with_pool) > 0  # the pool did come in, in its own slots
    # and the pool's slots follow the bound: expected synthetic draws per batch = sum of the class rates
    counts = np.bincount(labels)
    expected = synthetic_rates(counts, np.bincount(extra_labels), real_class_weights(counts, "balanced"),
                               batch_size=8, synthetic_share=1.0).sum()
    assert np.mean([n for *_, n in with_pool]) == pytest.approx(expected, rel=0.1)


def test_same_seed_same_batches_and_resume_continues_the_same_sequence():
    images, labels = _data([30, 30], channels=1, size=16)
    aug = build_augmentation("standard", channels=1, seed=0)

    def batches(seed, start_step=0, num_workers=0):
        loader = make_train_loader(images, labels, batch_size=8, steps=6, seed=seed, augment=aug,
                                   start_step=start_step, num_workers=num_workers)
        return [(b["index"].clone(), b["image"].clone()) for b in loader]

    a, b = batches(5), batches(5)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    tail = batches(5, start_step=4)
    assert len(tail) == 2
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a[4:], tail, strict=True))
    in_workers = batches(5, num_workers=1)  # augmentation seeds travel with the draw, not the process
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a, in_workers, strict=True))
    other = batches(6)
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, other, strict=True))


def test_augmentation_is_applied_per_draw_and_stays_in_range():
    images, labels = _data([1], size=16)  # one image drawn 64 times
    aug = build_augmentation("strong", channels=1, seed=0)
    batch = next(iter(make_train_loader(images, labels, batch_size=64, steps=1, seed=0, augment=aug)))
    x = batch["image"].numpy()
    assert x.shape == (64, 1, 16, 16) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    distinct = {arr.tobytes() for arr in x}
    assert len(distinct) > 16  # draws are augmented independently, not one transform per batch
    plain = next(iter(make_train_loader(images, labels, batch_size=4, steps=1, seed=0)))["image"].numpy()
    assert all(np.array_equal(p, images[0]) for p in plain)


def test_provenance_ids_and_bad_input():
    images, labels = _data([4, 4])
    extra_images, extra_labels = _data([3, 3], seed=1)
    ids = [f"syn-r01-{i:06d}" for i in range(6)]
    loader = make_train_loader(images, labels, batch_size=32, steps=3, seed=0, extra_images=extra_images,
                               extra_labels=extra_labels, extra_ids=ids)
    ds = loader.dataset
    for batch in loader:
        for idx, syn in zip(batch["index"].tolist(), batch["synthetic"].tolist(), strict=True):
            assert ds.ids[idx].startswith("syn-") == syn
    with pytest.raises(DataError, match="extra images but 2 extra ids"):
        make_train_loader(images, labels, batch_size=4, steps=1, seed=0, extra_images=extra_images,
                          extra_labels=extra_labels, extra_ids=ids[:2])
    with pytest.raises(DataError, match="per image"):
        make_train_loader(images, labels, batch_size=4, steps=1, seed=0, extra_images=extra_images[:, :, :4],
                          extra_labels=extra_labels)
    with pytest.raises(DataError, match="3 images but 8 labels"):
        make_train_loader(images[:3], labels, batch_size=4, steps=1, seed=0)
