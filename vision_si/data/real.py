"""A run's real images, split once: the one path from a run config to train / val / test.

The loop and the batch jobs (`vsi generate --plan`) both come through `load_real_data`, so a batch
job's generator trains on exactly the `train` split the run has:

- the source is loaded (`load_source`, `max_per_class` chosen by the run's seed);
- a run directory that has its `splits.csv` gives the split, after the file is checked against the
  digest the run recorded (`rundir.check_splits_record`: an edited split is an
  `EvaluationInvariantError`), and every image is checked against the sha256 it has there;
- otherwise the split is made by `make_splits` with the split seed (`config.split_seed`:
  `data.split.seed`, else the run's seed) and, when `record` is set, written with its digest.

`RealData.split(name)` gives a split as `LabelledImages`; pixels are loaded once per split, and
`test` only when asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vision_si.config import DataConfig, RunConfig, split_seed
from vision_si.data.arrays import LabelledImages
from vision_si.data.images import load_images
from vision_si.data.sources import load_source
from vision_si.data.splits import SPLITS, make_splits, read_splits_csv, split_groups, splits_csv_text
from vision_si.data.table import SampleTable
from vision_si.errors import RunDirError
from vision_si.rundir import check_splits_record, write_splits_record


@dataclass
class RealData:
    """The real images of a run and their split (an array of 'train' / 'val' / 'test', one per row)."""

    data_cfg: DataConfig
    table: SampleTable
    splits: np.ndarray
    _pixels: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def classes(self) -> list[str]:
        return list(self.table.classes)

    def index(self, split: str) -> np.ndarray:
        """Rows of the table in `split`, in table order."""
        return np.flatnonzero(self.splits == split)

    def labels(self, split: str) -> np.ndarray:
        return self.table.labels[self.index(split)]

    def ids(self, split: str) -> list[str]:
        return [self.table.ids[i] for i in self.index(split)]

    def sha256(self, split: str) -> list[str]:
        return [self.table.sha256[i] for i in self.index(split)]

    def pixels(self, split: str) -> np.ndarray:
        """N×C×H×W float32 of `split`, loaded (through the image cache) on first use."""
        if split not in self._pixels:
            self._pixels[split] = load_images(self.table, self.index(split), self.data_cfg)
        return self._pixels[split]

    def split(self, split: str) -> LabelledImages:
        return LabelledImages(self.pixels(split), self.labels(split), self.ids(split), self.sha256(split))

    def counts(self) -> dict[str, int]:
        return {s: int((self.splits == s).sum()) for s in SPLITS}


def load_real_data(cfg: RunConfig, *, run_dir: Path | None = None, record: bool = False, progress: bool = True,
                   check_split: Callable[[Path], None] | None = None) -> RealData:
    """The real data of `cfg` with its split (see the module doc).

    `run_dir`: a run directory whose `splits.csv` decides the split when it has one; with `record`,
    a split made here is written there (`splits.csv` and `splits.sha256`). Without `record`, a run
    directory must already have its split (a batch job never makes a run's split). `check_split(path)`
    is called on a run's existing `splits.csv` once its digest has checked, before anything else
    reads it (the loop's evaluation invariants).
    """
    has_split = run_dir is not None and check_splits_record(run_dir)  # before the data loads
    if has_split and check_split is not None:
        check_split(Path(run_dir) / "splits.csv")
    if run_dir is not None and not has_split and not record:
        raise RunDirError(f"'{run_dir}' has no splits.csv yet: run its first stage (`vsi train {run_dir}`) "
                          "before a batch job reads its split")
    table = load_source(cfg.data, cfg.seed, progress=progress)
    if has_split:
        splits = read_splits_csv(Path(run_dir) / "splits.csv", table)
    else:
        splits = make_splits(table, cfg.data.split, split_seed(cfg))
        if run_dir is not None:
            write_splits_record(run_dir, splits_csv_text(table, splits, split_groups(table, cfg.data.split)))
    return RealData(cfg.data, table, np.asarray(splits))
