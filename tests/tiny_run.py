"""The smallest real run (digits at 16 px, resnet10t, the `tiny` generator preset) for tests that need a run directory.

Module-scoped fixtures build one with `make_run` and hand each test its own `copy_run`, so a test
may damage its copy freely.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

TINY: dict[str, Any] = {
    "name": "tiny", "seed": 0,
    "data": {"source": "digits", "image_size": 16, "max_per_class": 10, "augment": "none"},
    "classifier": {"arch": "resnet10t", "steps": 4, "batch_size": 16, "warmup_steps": 1, "eval_every": 2,
                   "predict_batch_size": 128},
    "diagnose": {"budget_total": 8, "n_bootstrap": 100, "max_clusters": 2, "min_slice_size": 2},
    "generate": {"preset": "tiny", "batch_size": 8},
    "gate": {"n_bootstrap": 100},
    "loop": {"max_rounds": 1},
}


def merge(cfg: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with `changes` applied in place: a dict updates that section, anything else sets the key."""
    for key, value in changes.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    return cfg


def tiny_config(folder: Path, **changes: Any) -> dict[str, Any]:
    """TINY with runs and caches under `folder`, and `changes` merged in (see `merge`)."""
    cfg = copy.deepcopy(TINY)
    cfg["output_dir"] = str(folder / "runs")
    cfg["data"]["cache_dir"] = str(folder / "cache")
    cfg["generate"]["cache_dir"] = str(folder / "cache" / "gen")
    return merge(cfg, changes)


def make_run(folder: Path, *, until: str | None = None, **changes: Any) -> Path:
    """Run the tiny config (`changes` as in `tiny_config`) to the end, or up to the stage `until`; returns the run dir."""
    from vision_si.config import config_from_dict
    from vision_si.loop import run_loop

    return run_loop(config_from_dict(tiny_config(folder, **changes)), progress=False, echo=lambda _m: None,
                    until=until)


def copy_run(run: Path, folder: Path) -> Path:
    """A private copy of `run` under `folder`, with the same directory name."""
    dst = folder / run.name
    shutil.copytree(run, dst)
    return dst
