"""Data sources. Each returns a `SampleTable`; `load_source` picks one from a `DataConfig`.

- `load_elpv`: the ELPV solar-cell electroluminescence dataset from the `elpv-dataset` package
  (2,624 grayscale 300×300 cells). The annotated defect probability becomes four ordinal classes:
  0 → `functional`, 1/3 → `possibly_defective`, 2/3 → `likely_defective`, 1 → `defective`. Ids
  are `elpv:<file stem>` (`elpv:cell0001`); the cell type (`mono`/`poly`) is `metadata['type']`.
- `load_imagefolder`: `root/<class>/**/<image>`; class names are the folder names, sorted. DICOM
  files (`.dcm`, `.dicom`) count as images (read by `vision_si.data.dicom`, the `dicom` extra).
- `load_csv`: `path,label[,group][,more...]`; paths are relative to the CSV's folder, which is
  also the dataset root that no path may leave; other columns become metadata. A path may name a
  DICOM file, with or without an extension (recognised by its `DICM` marker).
- `load_medmnist`: an official MedMNIST `.npz`; its own train/val/test split is kept in
  `source_splits`. Class names are the label numbers (`"0"`, `"1"`, ...), as in the file.
- `load_digits`: scikit-learn's bundled 8×8 digits scaled to [0, 1], for tiny tests.
- `load_unlabelled`: a folder of images without labels (`data.unlabelled`), read only by the
  self-supervised pretraining; copies of val/test images are left out before decoding.

See `vision_si/data/files.py` for the checks every file-backed source runs.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import zipfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from vision_si.config import DataConfig, DicomConfig, resolve_path
from vision_si.data.decode import IMAGE_EXTENSIONS
from vision_si.data.files import (
    BadImages,
    FileLoader,
    FileRecord,
    cap_per_class,
    drop_duplicates,
    sha256_file,
    table_from_files,
)
from vision_si.data.table import SampleTable
from vision_si.errors import DataError

ELPV_CLASSES = ["functional", "possibly_defective", "likely_defective", "defective"]
# elpv-dataset is on PyPI (vision_si itself is not): `make setup` installs it as the `elpv` extra
ELPV_INSTALL = "`pip install elpv-dataset` (in a checkout: `make setup` or `pip install -e '.[elpv]'`)"


def load_elpv(*, on_bad_image: str = "error", max_per_class: int | None = None, seed: int = 0,
              progress: bool = True) -> SampleTable:
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or spec.origin is None:
        raise DataError(f"data.source 'elpv' needs the elpv-dataset package, which is not installed: {ELPV_INSTALL}")
    labels_csv = Path(spec.origin).parent / "data" / "labels.csv"
    if not labels_csv.is_file():
        raise DataError(f"{labels_csv}: ELPV labels file missing; reinstall with "
                        "`pip install --force-reinstall elpv-dataset`")
    records = []
    for n, line in enumerate(labels_csv.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            rel, prob, cell_type = parts[0], float(parts[1]), parts[2]
        except (IndexError, ValueError):
            raise DataError(f"{labels_csv}: row {n} is not 'path probability type': {line!r}") from None
        level = round(prob * 3)
        if not 0 <= level <= 3 or abs(prob * 3 - level) > 1e-6:
            raise DataError(f"{labels_csv}: row {n} has defect probability {prob}; expected 0, 1/3, 2/3 or 1")
        path = labels_csv.parent / rel
        records.append(FileRecord(id=f"elpv:{Path(rel).stem}", path=path, label=ELPV_CLASSES[level],
                                  where=str(path), metadata={"type": cell_type, "probability": prob}))
    return table_from_files(records, ELPV_CLASSES, name="elpv", on_bad_image=on_bad_image,
                            max_per_class=max_per_class, seed=seed, progress=progress)


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def load_imagefolder(root: str | Path, *, alpha: str = "composite_black", on_bad_image: str = "error",
                     max_per_class: int | None = None, seed: int = 0, progress: bool = True,
                     dicom: DicomConfig | None = None) -> SampleTable:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root: '{root}' is not a folder (expected root/<class>/<image>)")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class folders found (expected root/<class>/<image>)")
    bad = BadImages(on_bad_image)
    records, classes = [], []
    for d in class_dirs:
        files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                       and not _is_hidden(p.relative_to(root)) and p.is_file())
        if not files:
            bad.report(str(d), f"{d}: class folder '{d.name}' has no images ({', '.join(IMAGE_EXTENSIONS)})")
            continue
        classes.append(d.name)
        for p in files:
            rel = p.relative_to(root).as_posix()
            records.append(FileRecord(id=rel, path=p, label=d.name, where=str(p)))
    if not records:
        raise DataError(f"{root}: no images in any class folder")
    return table_from_files(records, classes, name=root.name, alpha=alpha, on_bad_image=on_bad_image,
                            max_per_class=max_per_class, seed=seed, progress=progress, bad=bad, dicom=dicom)


UNLABELLED_CLASS = "unlabelled"  # the one pseudo-class of an unlabelled table; its labels mean nothing


def load_unlabelled(root: str | Path, *, alpha: str = "composite_black", on_bad_image: str = "error",
                    progress: bool = True, dicom: DicomConfig | None = None,
                    exclude_sha256: Collection[str] = ()) -> tuple[SampleTable, list[dict[str, str]]]:
    """`data.unlabelled`: every image below `root` (any depth, hidden files skipped) as a table with
    one pseudo-class, ids `unlabelled:<path relative to root>`, for the self-supervised pretraining.

    Files whose sha256 is in `exclude_sha256` (the run's val/test images) are left out after hashing
    and before any decoding; they come back as `(table, excluded)` with `id`, `path` and `sha256`.
    Bad images follow `on_bad_image`, as in every source.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.unlabelled: '{root}' is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                   and not _is_hidden(p.relative_to(root)) and p.is_file())
    hashes = [sha256_file(p) for p in tqdm(files, desc="unlabelled: hashing", disable=not progress)]
    forbidden = set(exclude_sha256)
    records, kept, excluded = [], [], []
    for p, h in zip(files, hashes, strict=True):
        rid = f"unlabelled:{p.relative_to(root).as_posix()}"
        if h in forbidden:
            excluded.append({"id": rid, "path": str(p), "sha256": h})
            continue
        records.append(FileRecord(id=rid, path=p, label=UNLABELLED_CLASS, where=str(p)))
        kept.append(h)
    if not records:
        empty = SampleTable(ids=[], labels=np.zeros(0, np.int64), classes=[UNLABELLED_CLASS], sources=[], sha256=[],
                            groups=[], metadata=[], loader=FileLoader((), alpha, dicom), name="unlabelled", channels=1)
        return empty, excluded
    table = table_from_files(records, [UNLABELLED_CLASS], name="unlabelled", alpha=alpha, on_bad_image=on_bad_image,
                             progress=progress, dicom=dicom, hashes=kept)
    return table, excluded


def sort_class_names(names: set[str]) -> list[str]:
    """Numeric order when every name is an integer ("2" before "10"), else alphabetical."""
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def load_csv(csv_path: str | Path, *, alpha: str = "composite_black", on_bad_image: str = "error",
             max_per_class: int | None = None, seed: int = 0, progress: bool = True,
             dicom: DicomConfig | None = None) -> SampleTable:
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"data.csv: '{csv_path}' not found")
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{csv_path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip() for c in reader.fieldnames or []]
    if "path" not in columns or "label" not in columns:
        raise DataError(f"{csv_path}: the header must have 'path' and 'label' columns, found {columns}")
    reader.fieldnames = columns
    root = csv_path.parent.resolve()
    bad = BadImages(on_bad_image)
    records = []
    for row in reader:
        n = reader.line_num
        cell = (row.get("path") or "").strip()
        label = (row.get("label") or "").strip()
        where = f"row {n} of {csv_path} ({cell})"
        if not cell or not label:
            raise DataError(f"{csv_path}: row {n} has an empty path or label")
        full = Path(cell) if Path(cell).is_absolute() else csv_path.parent / cell
        # resolve() follows symlinks, so a link that points outside the root is caught too
        if not full.resolve().is_relative_to(root):
            raise DataError(f"{where}: the path leaves the dataset root {root}; paths must stay inside it")
        if not full.is_file():
            bad.report(str(full), f"{where}: no such image file")
            continue
        group = (row.get("group") or "").strip() or None
        meta = {k: (v or "").strip() for k, v in row.items() if k not in ("path", "label", "group") and k}
        rel = Path(os.path.relpath(os.path.normpath(csv_path.parent.resolve() / cell), root)).as_posix()
        records.append(FileRecord(id=rel, path=full, label=label, where=where, group=group, metadata=meta))
    if not records:
        raise DataError(f"{csv_path}: no usable rows")
    # the same path listed twice is one image: drop_duplicates (by sha256) handles it, but the ids
    # must be unique before that, so repeated rows of one path are folded into the first here.
    seen: dict[str, FileRecord] = {}
    for r in records:
        first = seen.setdefault(r.id, r)
        if first is not r and first.label != r.label:
            raise DataError(f"{r.where}: the same file is also labelled '{first.label}' in {first.where}")
    records = list(seen.values())
    classes = sort_class_names({r.label for r in records})
    return table_from_files(records, classes, name=csv_path.stem, alpha=alpha, on_bad_image=on_bad_image,
                            max_per_class=max_per_class, seed=seed, progress=progress, bad=bad, dicom=dicom)


@dataclass(frozen=True)
class ArrayLoader:
    """Row `j` of an in-memory image array as float32 H×W×C in [0, 1] (picklable)."""

    images: np.ndarray
    rows: np.ndarray
    scale: float

    def __call__(self, j: int) -> np.ndarray:
        im = self.images[self.rows[j]].astype(np.float32) / self.scale
        return np.clip(im if im.ndim == 3 else im[:, :, None], 0.0, 1.0)


def _array_table(name: str, images: np.ndarray, labels: np.ndarray, classes: list[str], ids: list[str],
                 sources: list[str], source_splits: list[str | None] | None,
                 on_bad_image: str) -> SampleTable:
    """A table over in-memory uint8/float images (N×H×W or N×H×W×C), duplicates checked like files."""
    hashes = [hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images]
    bad = BadImages(on_bad_image)
    keep = np.array(drop_duplicates(hashes, [classes[k] for k in labels], sources, bad), dtype=np.int64)
    scale = 255.0 if images.dtype == np.uint8 else (65535.0 if images.dtype == np.uint16 else 1.0)
    channels = 1 if images.ndim == 3 else images.shape[3]
    if channels not in (1, 3):
        raise DataError(f"{name}: images have {channels} channels; 1 or 3 are supported")

    return SampleTable(ids=[ids[i] for i in keep], labels=labels[keep], classes=classes,
                       sources=[sources[i] for i in keep], sha256=[hashes[i] for i in keep],
                       groups=[None] * len(keep), metadata=[{} for _ in keep], loader=ArrayLoader(images, keep, scale), name=name,
                       source_splits=None if source_splits is None else [source_splits[i] for i in keep],
                       channels=channels, skipped=bad.skipped, in_memory=True)


def load_medmnist(npz_path: str | Path, *, on_bad_image: str = "error") -> SampleTable:
    npz_path = Path(npz_path)
    if not npz_path.is_file():
        raise DataError(f"data.npz: '{npz_path}' not found")
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{npz_path}: not a readable .npz file ({exc})") from None
    images, labels, splits, ids, sources = [], [], [], [], []
    for split in ("train", "val", "test"):
        ik, lk = f"{split}_images", f"{split}_labels"
        if ik not in arrays and lk not in arrays:
            continue
        if ik not in arrays or lk not in arrays:
            raise DataError(f"{npz_path}: has one of '{ik}'/'{lk}' without the other")
        im, lab = arrays[ik], arrays[lk]
        if lab.ndim == 2 and lab.shape[1] != 1:
            raise DataError(f"{npz_path}: '{lk}' has {lab.shape[1]} labels per image (multi-label); "
                            "only single-label MedMNIST sets are supported")
        lab = lab.reshape(-1)
        if len(lab) != len(im) or im.ndim not in (3, 4):
            raise DataError(f"{npz_path}: '{ik}' has shape {im.shape} but '{lk}' has {len(lab)} labels "
                            "(expected N×H×W or N×H×W×C images and N labels)")
        images.append(im)
        labels.append(lab.astype(np.int64))
        splits += [split] * len(lab)
        ids += [f"medmnist:{split}:{i:06d}" for i in range(len(lab))]
        sources += [f"{npz_path}#{split}/{i}" for i in range(len(lab))]
    if not images:
        raise DataError(f"{npz_path}: no 'train_images'/'train_labels' (or val_/test_) arrays; "
                        f"found {sorted(arrays)}")
    if len({im.shape[1:] for im in images}) != 1:
        raise DataError(f"{npz_path}: the splits' images have different shapes")
    all_labels = np.concatenate(labels)
    if all_labels.min() < 0:
        raise DataError(f"{npz_path}: labels must be >= 0, found {all_labels.min()}")
    classes = [str(k) for k in range(int(all_labels.max()) + 1)]
    return _array_table(npz_path.stem, np.concatenate(images), all_labels, classes, ids, sources,
                        splits, on_bad_image)


def load_digits(*, on_bad_image: str = "error") -> SampleTable:
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = (bunch.images / 16.0).astype(np.float32)  # 0..16 → [0, 1]
    n = len(images)
    return _array_table("digits", images, bunch.target.astype(np.int64), [str(k) for k in range(10)],
                        [f"digits:{i:04d}" for i in range(n)],
                        [f"sklearn.datasets.load_digits#{i}" for i in range(n)], None, on_bad_image)


def _required(cfg: DataConfig, key: str) -> Path:
    value = getattr(cfg, key)
    if not value:
        raise DataError(f"data.{key} is required when data.source is '{cfg.source}'")
    return resolve_path(value)


def load_source(cfg: DataConfig, seed: int, *, progress: bool = True) -> SampleTable:
    """The table `cfg.source` describes, with `max_per_class` applied (a per-class subset chosen by `seed`)."""
    common = {"on_bad_image": cfg.on_bad_image}
    files = {**common, "max_per_class": cfg.max_per_class, "seed": seed, "progress": progress}
    if cfg.source == "elpv":
        return load_elpv(**files)
    if cfg.source == "imagefolder":
        return load_imagefolder(_required(cfg, "root"), alpha=cfg.alpha, dicom=cfg.dicom, **files)
    if cfg.source == "csv":
        return load_csv(_required(cfg, "csv"), alpha=cfg.alpha, dicom=cfg.dicom, **files)
    if cfg.source == "medmnist":
        table = load_medmnist(_required(cfg, "npz"), **common)
    elif cfg.source == "digits":
        table = load_digits(**common)
    else:
        raise DataError(f"data.source: unknown source {cfg.source!r}; allowed: elpv, imagefolder, csv, medmnist, digits")
    return table.subset(cap_per_class(table.labels, cfg.max_per_class, seed))
