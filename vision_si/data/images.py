"""Pixels for the model: N×C×H×W float32 in [0, 1] at the configured size, cached on disk.

`load_images` decodes rows of a `SampleTable`, converts them to the run's channel count
(`DataConfig.channels`, else the data's own), resizes them (`DataConfig.resize`) and caches each
result as one `.npy` under `DataConfig.cache_dir`. The cache key is the image's sha256 plus
everything that changes the pixels (size, channels, resize policy, alpha policy, and a format
version; the DICOM window when it is not the default), so two runs or two datasets that share an image
share its entry, and an edited file gets a new one. Writes are atomic (`rundir.atomic_write_bytes`), so a
killed run never leaves a
half-written entry. In-memory sources (digits, medmnist) skip the disk cache: their pixels are
already decoded. An empty `cache_dir` turns the cache off.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from vision_si.config import DataConfig, DicomConfig
from vision_si.data.decode import convert_channels, decode_image, resize_image
from vision_si.data.table import SampleTable
from vision_si.rundir import atomic_write_bytes

CACHE_VERSION = 1  # bump when decoding or resizing changes, so old cache entries are not reused


def _prepare(arr: np.ndarray, cfg: DataConfig, channels: int) -> np.ndarray:
    """H×W×C → C×H×W at the configured size and channel count."""
    arr = resize_image(convert_channels(arr, channels), cfg.image_size, cfg.resize)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def cache_folder(cfg: DataConfig, channels: int) -> Path:
    key = f"v{CACHE_VERSION}-s{cfg.image_size}-c{channels}-{cfg.resize}-{cfg.alpha}"
    if cfg.dicom != DicomConfig():  # a DICOM window of the config's own changes the pixels of DICOM files
        key += f"-dicom-{cfg.dicom.window}-{cfg.dicom.center}-{cfg.dicom.width}"
    return Path(cfg.cache_dir) / "images" / key


def _read_cached(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None  # missing or damaged: decode again and overwrite
    return arr if arr.shape == shape and arr.dtype == np.float32 else None


def _write_cached(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def run_channels(table: SampleTable, cfg: DataConfig) -> int:
    """The channel count images get in this run: the config's, else the data's own."""
    if cfg.channels is not None:
        return cfg.channels
    if table.channels is not None:
        return table.channels
    return table.load(0).shape[2] if len(table) else 1


def load_images(table: SampleTable, indices: Sequence[int] | np.ndarray, cfg: DataConfig, *,
                progress: bool = False) -> np.ndarray:
    """Rows `indices` of `table` as N×C×H×W float32 in [0, 1] (see the module doc for the cache)."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    channels = run_channels(table, cfg)
    size = cfg.image_size
    out = np.empty((len(indices), channels, size, size), dtype=np.float32)
    folder = None if table.in_memory or not cfg.cache_dir else cache_folder(cfg, channels)
    for n, i in enumerate(tqdm(indices, desc="loading images", disable=not progress)):
        path = None
        if folder is not None:
            sha = table.sha256[i]
            path = folder / sha[:2] / f"{sha}.npy"
            cached = _read_cached(path, out.shape[1:])
            if cached is not None:
                out[n] = cached
                continue
        out[n] = _prepare(table.load(i), cfg, channels)
        if path is not None:
            _write_cached(path, out[n])
    return out


def load_image_files(paths: Sequence[str | Path], cfg: DataConfig, channels: int | None = None) -> np.ndarray:
    """Image files (e.g. synthetic PNGs read back from a run) → N×C×H×W float32, same policy as
    `load_images`; `channels` defaults to `cfg.channels`, else each file's own (then all must agree)."""
    channels = channels if channels is not None else cfg.channels
    return stack_images([decode_image(p, channels, cfg.alpha) for p in paths], cfg, channels)


def stack_images(arrays: Sequence[np.ndarray], cfg: DataConfig, channels: int | None = None) -> np.ndarray:
    """Decoded H×W×C images → N×C×H×W float32 at the configured size (each keeps its decoded channels,
    which must agree)."""
    out = [_prepare(arr, cfg, arr.shape[2]) for arr in arrays]
    if not out:
        return np.zeros((0, channels or 1, cfg.image_size, cfg.image_size), dtype=np.float32)
    if len({a.shape for a in out}) != 1:
        raise ValueError("files decode to different channel counts; pass channels=1 or channels=3")
    return np.stack(out)
