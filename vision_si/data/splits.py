"""Train/val/test splits of real images, and `splits.csv`.

`make_splits` is deterministic for a seed and data:

- Without groups, every class is split on its own: `round(test_fraction × n)` of its images go to
  `test`, then `round(val_fraction × rest)` to `val`, the rest to `train`, so each class's counts
  are within one image of the exact proportions. Each class keeps at least one image in every split
  (scikit-learn's stratified splitters can leave a small class with none, which would make its
  val/test metrics undefined); a class with fewer than 3 images is an error naming it.
- With groups (a source's group column, the metadata key `split.group_by`, or with `split.group_by:
  dicom:<Keyword>` that attribute of each file's DICOM header, e.g. `dicom:PatientID`), whole groups move
  together: scikit-learn's `StratifiedGroupKFold` takes one fold as `test`, with
  `round(1 / test_fraction)` folds, then one fold of the rest as `val`, with
  `round(1 / val_fraction)` folds. The fractions are therefore approximate (1/4, 1/5, ...), and
  no group appears in two splits. Rows without a group count as groups of one.
- With `split.use_source_split`, the split shipped with the data (MedMNIST) is used as is.

Any split that leaves a class without `val` or `test` images is a `DataError` naming the class and
its image count.
"""

from __future__ import annotations

import csv
import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from vision_si.config import DICOM_GROUP_PREFIX, SplitConfig
from vision_si.data.dicom import dicom_attribute
from vision_si.data.table import SampleTable
from vision_si.errors import DataError

SPLITS = ("train", "val", "test")
SPLITS_COLUMNS = ("id", "source", "sha256", "class", "group", "split")


def split_groups(table: SampleTable, split_cfg: SplitConfig) -> list[str | None] | None:
    """The groups splitting must respect: `split.group_by` metadata, else the source's, else None."""
    key = split_cfg.group_by
    if key is None:
        return list(table.groups) if table.has_groups else None
    if key.startswith(DICOM_GROUP_PREFIX):  # e.g. dicom:PatientID: one patient never spans two splits
        keyword = key[len(DICOM_GROUP_PREFIX):]
        if table.in_memory:
            raise DataError(f"data.split.group_by: {key} reads DICOM files, but source '{table.name}' has no files")
        groups = [dicom_attribute(source, keyword) for source in table.sources]
        missing = [table.sources[i] for i, g in enumerate(groups) if g is None]
        if missing:
            raise DataError(f"data.split.group_by: {len(missing)} DICOM file(s) of '{table.name}' have no "
                            f"{keyword} (first: {missing[0]}); every image needs one to be grouped by it")
        return groups
    missing = [table.ids[i] for i, m in enumerate(table.metadata) if key not in m]
    if missing:
        available = sorted({k for m in table.metadata for k in m})
        raise DataError(f"data.split.group_by: '{key}' is not in the metadata of {len(missing)} samples "
                        f"of '{table.name}' (first: {missing[0]}); metadata keys: {available}")
    return [None if table.metadata[i][key] in (None, "") else str(table.metadata[i][key])
            for i in range(len(table))]


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))


def _stratified(labels: np.ndarray, classes: Sequence[str], split_cfg: SplitConfig, seed: int) -> np.ndarray:
    out = np.full(len(labels), "train", dtype="<U5")
    for c, name in enumerate(classes):
        rows = np.flatnonzero(labels == c)
        n = len(rows)
        if n < 3:
            raise DataError(f"class '{name}' has {n} image(s); a split needs at least 3 "
                            "(one each for train, val and test)")
        # one generator per class: adding a class elsewhere does not reshuffle this one
        rows = np.random.default_rng([seed, c]).permutation(rows)
        n_test = min(max(_round(split_cfg.test_fraction * n), 1), n - 2)
        n_val = min(max(_round(split_cfg.val_fraction * (n - n_test)), 1), n - n_test - 1)
        out[rows[:n_test]] = "test"
        out[rows[n_test:n_test + n_val]] = "val"
    return out


def _group_fold(rows: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int,
                what: str) -> np.ndarray:
    """Rows (a subset of `rows`) of one StratifiedGroupKFold fold holding about `fraction` of them."""
    k = max(2, _round(1.0 / fraction))
    n_groups = len(np.unique(groups[rows]))
    if n_groups < k:
        raise DataError(f"only {n_groups} groups remain for the '{what}' split; grouped splitting with "
                        f"fraction {fraction} needs at least {k}")
    largest = int(np.bincount(labels[rows]).max()) if len(rows) else 0
    if largest < k:  # scikit-learn refuses when no class has as many members as folds
        raise DataError(f"the '{what}' split with fraction {fraction} takes one of {k} group folds, but no class has "
                        f"{k} images (the largest has {largest}); raise the fraction or add images")
    folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # sklearn warns about classes smaller than k; check_splits names the class if it matters
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        _, held = next(folds.split(np.zeros(len(rows)), labels[rows], groups[rows]))
    return rows[held]


def _grouped(labels: np.ndarray, groups: Sequence[str | None], split_cfg: SplitConfig, seed: int) -> np.ndarray:
    # rows without a group are their own group; the prefix keeps them apart from real group names
    keys = np.array([f"g:{g}" if g is not None else f"row:{i}" for i, g in enumerate(groups)], dtype=object)
    codes = np.unique(keys, return_inverse=True)[1]
    out = np.full(len(labels), "train", dtype="<U5")
    everything = np.arange(len(labels))
    test = _group_fold(everything, labels, codes, split_cfg.test_fraction, seed, "test")
    out[test] = "test"
    rest = np.flatnonzero(out == "train")
    out[_group_fold(rest, labels, codes, split_cfg.val_fraction, seed + 1, "val")] = "val"
    return out


def check_splits(table: SampleTable, splits: np.ndarray, how: str = "") -> None:
    """Every class needs images in train, val and test."""
    for c, name in enumerate(table.classes):
        in_class = table.labels == c
        for split in SPLITS:
            if not np.any(splits[in_class] == split):
                raise DataError(f"class '{name}' has {int(in_class.sum())} image(s) and none of them lands "
                                f"in '{split}'{how}; add images or merge the class")


def make_splits(table: SampleTable, split_cfg: SplitConfig, seed: int) -> np.ndarray:
    """'train' / 'val' / 'test' for every row of `table`; see the module doc."""
    if len(table) == 0:
        raise DataError(f"dataset '{table.name}' has no images to split")
    if split_cfg.use_source_split:
        if table.source_splits is None:
            raise DataError(f"data.split.use_source_split: source '{table.name}' ships no split of its own")
        bad = sorted({str(s) for s in table.source_splits if s not in SPLITS})
        if bad:
            raise DataError(f"data.split.use_source_split: '{table.name}' has split names {bad}; "
                            f"allowed: {list(SPLITS)}")
        splits = np.array(table.source_splits, dtype="<U5")
        how = " of the source's own split"
    else:
        groups = split_groups(table, split_cfg)
        if groups is None:
            splits = _stratified(table.labels, table.classes, split_cfg, seed)
            how = ""
        else:
            splits = _grouped(table.labels, groups, split_cfg, seed)
            how = " when whole groups are kept together"
    check_splits(table, splits, how)
    return splits


def splits_csv_text(table: SampleTable, splits: np.ndarray,
                    groups: Sequence[str | None] | None = None) -> str:
    """The text of `splits.csv`: `id,source,sha256,class,group,split`, one row per image in table order."""
    if len(splits) != len(table):
        raise ValueError(f"{len(splits)} split labels for {len(table)} samples")
    groups = table.groups if groups is None else groups
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SPLITS_COLUMNS)
    for i in range(len(table)):
        writer.writerow([table.ids[i], table.sources[i], table.sha256[i], table.classes[table.labels[i]],
                         "" if groups[i] is None else groups[i], str(splits[i])])
    return buf.getvalue()


def write_splits_csv(table: SampleTable, splits: np.ndarray, path: str | Path,
                     groups: Sequence[str | None] | None = None) -> None:
    """`splits_csv_text` written to `path` atomically (a run writes it with its digest: `rundir.write_splits_record`)."""
    from vision_si.rundir import atomic_write_text

    atomic_write_text(Path(path), splits_csv_text(table, splits, groups))


def read_splits_csv(path: str | Path, table: SampleTable | None = None) -> list[dict[str, str]] | np.ndarray:
    """The rows of a `splits.csv` as dicts keyed by its columns; given `table`, instead the split of
    every row of `table` (see `align_splits`), which is what resuming a run needs."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: splits file not found") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if tuple(reader.fieldnames or ()) != SPLITS_COLUMNS:
        raise DataError(f"{path}: expected columns {','.join(SPLITS_COLUMNS)}, found {reader.fieldnames}")
    rows = list(reader)
    bad = [r["id"] for r in rows if r["split"] not in SPLITS]
    if bad:
        raise DataError(f"{path}: row for '{bad[0]}' has a split other than {', '.join(SPLITS)}")
    return rows if table is None else align_splits(table, rows, path)


def align_splits(table: SampleTable, rows: Sequence[dict[str, str]], path: str | Path = "splits.csv") -> np.ndarray:
    """The split of every row of `table` from a read `splits.csv`; the file must describe exactly this
    data (same ids and sha256), otherwise the data changed since the split was made."""
    by_id = {r["id"]: r for r in rows}
    if len(by_id) != len(table) or set(by_id) != set(table.ids):
        raise DataError(f"{path}: lists {len(by_id)} images but the data has {len(table)}; "
                        "the dataset changed since the split was written")
    out = np.empty(len(table), dtype="<U5")
    for i, (id_, sha) in enumerate(zip(table.ids, table.sha256, strict=True)):
        if by_id[id_]["sha256"] != sha:
            raise DataError(f"{path}: image '{id_}' has different bytes now (sha256 changed)")
        out[i] = by_id[id_]["split"]
    return out


def judge_split(labels: np.ndarray, judge_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of `val` that select (exemplars, thresholds, calibration) and that judge (the gate).

    Per class, `judge_fraction × n` images (rounded half up) judge and the rest select, drawn by `seed`;
    a class with at least two images keeps at least one on each side, a class with one image judges it. The images that chose what the round
    made are therefore never the ones that decide whether it joins training.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if not 0 < judge_fraction < 1:
        raise ValueError(f"judge_fraction must be between 0 and 1, got {judge_fraction}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    judge = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n = int(np.floor(judge_fraction * len(rows) + 0.5))  # half up: a class's only val image judges
        if len(rows) >= 2:
            n = min(max(n, 1), len(rows) - 1)
        judge.append(rows[:n])
    judge_idx = np.sort(np.concatenate(judge)) if judge else np.zeros(0, np.int64)
    select_idx = np.setdiff1d(np.arange(len(labels)), judge_idx)
    return select_idx, judge_idx
