"""What a run checks before it does any work, so that bad settings stop it in seconds, not after round 0.

- `check_settings`: the generator preset resolves and its backend's optional modules are installed
  (`check_preset`), the Ray engine has Ray, and a local `classifier.pretrained` weights file loads
  into the architecture, all before the data is loaded;
- `check_resources`: one round of images fits on disk and in memory (an upper estimate);
- `cpu_threads`: the run's `threads` setting, applied to torch and the BLAS/OpenMP pools.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path

from vision_si.config import RunConfig
from vision_si.errors import ConfigError
from vision_si.generators.presets import check_preset, resolve_preset


def check_settings(cfg: RunConfig) -> None:
    """Refuse, before the data loads, the settings that would otherwise fail later (see the module doc)."""
    try:
        check_preset(resolve_preset(cfg.generate))
    except ConfigError as exc:
        raise ConfigError(f"generate.preset: {exc}") from None
    if cfg.generate.engine == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("generate.engine 'ray' needs ray, which is not installed: install the `ray` extra "
                          "(`pip install -e '.[ray]'` in a checkout, or `make setup-dev`)")
    if cfg.classifier.pretrained not in ("none", "hub"):
        from vision_si.classifier import create_classifier

        # the class count and channels do not matter here: timm adapts the head and the first convolution
        create_classifier(cfg.classifier, 2, cfg.data.channels or 3, cfg.data.image_size)


def check_resources(cfg: RunConfig, n_images: int, channels: int, run_dir: Path) -> None:
    """Refuse before any work a run whose images cannot fit on disk or in memory (an upper estimate).

    Disk: one round's `diagnose.budget_total` PNGs, each at most C×H×(W+1) bytes (8 bits, a filter
    byte per row, zlib's stored blocks) plus 1 KB of headers. Memory: the real images and one round
    of candidates as float32 C×H×W, candidates counted twice (their array and the filters' copies).
    """
    px = channels * cfg.data.image_size ** 2
    budget = cfg.diagnose.budget_total
    png = budget * (channels * cfg.data.image_size * (cfg.data.image_size + 1) * 1.001 + 1024)
    free = shutil.disk_usage(run_dir).free
    if png > free:
        raise ConfigError(f"diagnose.budget_total={budget}: one round of {budget} images of "
                          f"{channels}x{cfg.data.image_size}x{cfg.data.image_size} needs up to {png / 1e9:.1f} GB "
                          f"on disk, but {run_dir.parent} has {free / 1e9:.1f} GB free; lower the budget or "
                          "data.image_size")
    import psutil

    available = psutil.virtual_memory().available
    real, synthetic = n_images * px * 4, 2 * budget * px * 4
    if real > available:
        raise ConfigError(f"data.image_size={cfg.data.image_size}: {n_images} real images of {channels}x"
                          f"{cfg.data.image_size}x{cfg.data.image_size} need {real / 1e9:.1f} GB of memory, "
                          f"{available / 1e9:.1f} GB is available; lower data.image_size or data.max_per_class")
    if real + synthetic > available:
        raise ConfigError(f"diagnose.budget_total={budget}: {budget} candidate images of {channels}x"
                          f"{cfg.data.image_size}x{cfg.data.image_size} need {synthetic / 1e9:.1f} GB of memory "
                          f"besides the real images' {real / 1e9:.1f} GB; {available / 1e9:.1f} GB is available; "
                          "lower the budget or data.image_size")


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Limit torch and the BLAS/OpenMP pools (numpy, scikit-learn) to `n` threads, restored on exit."""
    if n is None:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before)
