"""The tiny run for tests: `configs/tiny.yaml` (digits at 16 px, resnet10t, the `tiny` generator preset),
one definition for the smoke test, the loop tests, the fault benchmark and the fixtures.

`tiny_config(folder, fast=True)` takes it with `FAST` on top (fewer images, steps and bootstrap
resamples, one round): the smallest real run, for module-scoped fixtures that build a run directory
with `make_run` and hand each test its own `copy_run`, so a test may damage its copy freely.
`fast=False` keeps the config as `vsi run configs/tiny.yaml` runs it.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import yaml

TINY: dict[str, Any] = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml").read_text())
FAST: dict[str, Any] = {  # test speed: the same stages on less work
    "data": {"max_per_class": 20, "augment": "none"},  # two or more val images a class: both val halves,
    "classifier": {"steps": 4, "batch_size": 16, "warmup_steps": 1, "eval_every": 2},
    "diagnose": {"budget_total": 8, "n_bootstrap": 100, "max_clusters": 2, "min_slice_size": 2},
    "generate": {"batch_size": 8},
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


def tiny_config(folder: Path, *, fast: bool = True, **changes: Any) -> dict[str, Any]:
    """TINY (with FAST when `fast`) with runs and caches under `folder`, and `changes` merged in (see `merge`)."""
    cfg = copy.deepcopy(TINY)
    if fast:
        merge(cfg, copy.deepcopy(FAST))
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


def forge_splits(run: Path, text: str) -> None:
    """Replace a run's `splits.csv` and re-record its digest, as a forger who knows the digest file would:
    the digest check passes, so only the file's own checks (columns, ids, sha256, synthetic rows) can stop it."""
    import hashlib

    (run / "splits.csv").write_text(text)
    (run / "splits.sha256").write_text(f"{hashlib.sha256(text.encode()).hexdigest()}  splits.csv\n")
