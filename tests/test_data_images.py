"""`load_images`: shape, channels, resizing, the on-disk cache; `load_image_files` for synthetic PNGs."""

from __future__ import annotations

import numpy as np
from conftest import write_image

from vision_si.config import DataConfig
from vision_si.data import load_digits, load_image_files, load_imagefolder, load_images
from vision_si.data.images import cache_folder


def test_load_images_resizes_and_caches_by_sha256(image_folder, tmp_path):
    root = image_folder({"a": 3, "b": 3}, size=20)
    table = load_imagefolder(root, progress=False)
    cfg = DataConfig(source="imagefolder", root=str(root), image_size=8, cache_dir=str(tmp_path / "cache"))
    first = load_images(table, [0, 4, 2], cfg)
    assert first.shape == (3, 1, 8, 8) and first.dtype == np.float32
    assert first.min() >= 0 and first.max() <= 1
    entries = sorted((cache_folder(cfg, 1)).rglob("*.npy"))
    assert [p.stem for p in entries] == sorted(table.sha256[i] for i in (0, 4, 2))
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    # with the source files gone, the cache alone must serve the same pixels
    for p in root.rglob("*.png"):
        p.unlink()
    np.testing.assert_array_equal(load_images(table, [0, 4, 2], cfg), first)


def test_cache_key_separates_sizes_and_channels(image_folder, tmp_path):
    root = image_folder({"a": 3, "b": 3}, size=20)
    table = load_imagefolder(root, progress=False)
    base = dict(source="imagefolder", root=str(root), cache_dir=str(tmp_path / "cache"))
    small = load_images(table, [1], DataConfig(**base, image_size=8))
    big = load_images(table, [1], DataConfig(**base, image_size=16))
    rgb = load_images(table, [1], DataConfig(**base, image_size=8, channels=3))
    assert small.shape == (1, 1, 8, 8) and big.shape == (1, 1, 16, 16) and rgb.shape == (1, 3, 8, 8)
    np.testing.assert_allclose(rgb[:, 0], small[:, 0], atol=1e-6)


def test_damaged_cache_entry_is_rebuilt(image_folder, tmp_path):
    root = image_folder({"a": 3, "b": 3}, size=20)
    table = load_imagefolder(root, progress=False)
    cfg = DataConfig(source="imagefolder", root=str(root), image_size=8, cache_dir=str(tmp_path / "c"))
    good = load_images(table, [0], cfg)
    entry = next(cache_folder(cfg, 1).rglob("*.npy"))
    entry.write_bytes(b"half-written")
    np.testing.assert_array_equal(load_images(table, [0], cfg), good)


def test_colour_data_keeps_three_channels_unless_told(image_folder, tmp_path):
    root = image_folder({"a": 3, "b": 3})
    write_image(root / "a" / "colour.png", 77, mode="RGB")
    table = load_imagefolder(root, progress=False)
    cfg = DataConfig(image_size=8, cache_dir="")
    assert load_images(table, [0, 1], cfg).shape == (2, 3, 8, 8)
    assert load_images(table, [0, 1], DataConfig(image_size=8, channels=1, cache_dir="")).shape == (2, 1, 8, 8)


def test_in_memory_source_needs_no_cache(tmp_path):
    table = load_digits()
    cfg = DataConfig(source="digits", image_size=8, cache_dir=str(tmp_path / "cache"))
    out = load_images(table, np.arange(5), cfg)
    np.testing.assert_allclose(out[:, 0], np.stack([table.load(i)[:, :, 0] for i in range(5)]))
    assert not (tmp_path / "cache").exists()


def test_load_image_files_uses_the_same_policy(tmp_path):
    paths = [write_image(tmp_path / f"syn{i}.png", i, size=16) for i in range(3)]
    cfg = DataConfig(image_size=8, channels=3)
    out = load_image_files(paths, cfg)
    assert out.shape == (3, 3, 8, 8)
    assert load_image_files(paths, DataConfig(image_size=8), channels=1).shape == (3, 1, 8, 8)
    assert load_image_files([], DataConfig(image_size=8), channels=1).shape == (0, 1, 8, 8)
