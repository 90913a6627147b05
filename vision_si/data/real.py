"""A run's real images, split once: the one path from a run config to train / val / test.

The loop and the batch jobs (`vsi generate --plan`) both come through `load_real_data`, so a batch
job's generator trains on exactly the `train` split the run has:

- the source is loaded (`load_source`, `max_per_class` chosen by the run's seed);
- a run directory that has its `splits.csv` gives the split, after the file is checked against the
  digest the run recorded (`rundir.check_splits_record`: an edited split is an
  `EvaluationInvariantError`), and every image is checked against the sha256 it has there;
- otherwise the split is made by `make_splits` with the split seed (`config.split_seed`:
  `data.split.seed`, else the run's seed) and, when `record` is set, written with its digest.
- with `data.split.train_ids` (a text file of ids), the split is made on all the data and then the
  train images not listed are left out of the run's table (`keep_train_ids`): val and test are the
  full data's, so runs on different train subsamples are judged on the same images.

`RealData.split(name)` gives a split as `LabelledImages`; pixels are loaded once per split, and
`test` only when asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vision_si.config import DataConfig, RunConfig, resolve_path, split_seed
from vision_si.data.arrays import LabelledImages
from vision_si.data.images import load_images
from vision_si.data.sources import load_source
from vision_si.data.splits import (
    SPLITS,
    check_splits,
    make_splits,
    read_splits_csv,
    split_groups,
    splits_csv_text,
)
from vision_si.data.table import SampleTable
from vision_si.errors import DataError, RunDirError
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
    made = None
    if cfg.data.split.train_ids is not None:
        made = make_splits(table, cfg.data.split, split_seed(cfg))
        rows = keep_train_ids(table, made, read_id_list(cfg.data.split.train_ids))
        table, made = table.subset(rows), made[rows]
    if has_split:
        splits = read_splits_csv(Path(run_dir) / "splits.csv", table)
    else:
        splits = make_splits(table, cfg.data.split, split_seed(cfg)) if made is None else made
        if run_dir is not None:
            write_splits_record(run_dir, splits_csv_text(table, splits, split_groups(table, cfg.data.split)))
    return RealData(cfg.data, table, np.asarray(splits))


def read_id_list(path: str | Path) -> list[str]:
    """The ids of a text file, one per line (blank lines and `#` comments ignored)."""
    file = resolve_path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise DataError(f"data.split.train_ids: file '{path}' not found") from None
    except UnicodeDecodeError:
        raise DataError(f"data.split.train_ids: '{path}' is not UTF-8 text") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def keep_train_ids(table: SampleTable, splits: np.ndarray, ids: list[str]) -> np.ndarray:
    """Rows of `table` to keep: every val/test row, and the train rows whose id is in `ids`.

    An id that is not a train image of the data is a `DataError` naming it (a val/test id listed here
    would otherwise be a silent no-op); a class left without train images is one too.
    """
    train = {table.ids[i] for i in np.flatnonzero(splits == "train")}
    bad = [i for i in ids if i not in train]
    if bad:
        raise DataError(f"data.split.train_ids: '{bad[0]}' is not a train image of this data "
                        f"({len(bad)} such id(s)); list ids of the train split only")
    keep = set(ids)
    rows = np.asarray([i for i, id_ in enumerate(table.ids) if splits[i] != "train" or id_ in keep], np.int64)
    check_splits(table.subset(rows), splits[rows], " after data.split.train_ids")
    return rows
