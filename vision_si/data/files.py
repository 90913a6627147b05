"""From a list of image files to a checked `SampleTable`: hashing, duplicates, caps, decoding checks.

File-backed sources (elpv, imagefolder, csv) list their files as `FileRecord`s and hand them here,
so every source gets the same checks in the same order:

1. sha256 of every file's bytes (the id of its content in `splits.csv` and in the image cache);
2. duplicates: the same bytes under two different classes is an error naming both files (with
   `on_bad_image: skip`, every copy is dropped with a warning); the same bytes twice within one
   class keeps the first file in the source's order and warns, since a duplicate could otherwise
   land in `train` and in `test` at once. Every file dropped here is listed in `SampleTable.skipped`;
3. `max_per_class`: a seeded, per-class random subset (taken before decoding, so quick profiles
   stay quick);
4. a full decode of every remaining file (empty, truncated, non-image, decompression bomb). A bad
   file is a `DataError` naming it, or, with `on_bad_image: skip`, a `BadImageWarning` (issued once
   the progress bar has closed, so each has a line of its own) and an entry in `SampleTable.skipped`.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from vision_si.config import DicomConfig
from vision_si.data.decode import decode_array, decode_image, read_bytes
from vision_si.data.table import SampleTable
from vision_si.errors import DataError


class BadImageWarning(UserWarning):
    """An image was dropped because `on_bad_image` is `skip`."""


@dataclass
class FileRecord:
    id: str
    path: Path
    label: str  # class name
    where: str  # how errors name this sample: the path, or "row N of labels.csv (path)"
    group: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FileLoader:
    """Decodes row `j` from its file with the image's own channels (picklable, unlike a lambda)."""

    paths: tuple[str, ...]
    alpha: str
    dicom: DicomConfig | None = None

    def __call__(self, j: int) -> np.ndarray:
        return decode_image(self.paths[j], None, self.alpha, dicom=self.dicom)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    return digest.hexdigest()


def cap_per_class(labels: np.ndarray, max_per_class: int | None, seed: int) -> np.ndarray:
    """Indices keeping at most `max_per_class` rows of every class, chosen by `seed`, in original order."""
    labels = np.asarray(labels)
    if max_per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) > max_per_class:
            rows = rng.choice(rows, size=max_per_class, replace=False)
        keep.append(rows)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


class BadImages:
    """Collects the files a source leaves out: raises at once under `error`, warns and records under `skip`.

    `skipped` lists every file left out with its reason (`path`, `reason`), whatever the policy:
    a bad file under `skip`, both files of a pair with the same bytes in two classes, and the later
    copies of a file repeated within one class (left out under either policy).
    """

    def __init__(self, on_bad_image: str) -> None:
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.on_bad_image = on_bad_image
        self.skipped: list[dict[str, str]] = []

    def report(self, path: str, message: str) -> None:
        if self.on_bad_image == "error":
            raise DataError(message)
        self.record(path, message, f"skipped: {message}")

    def record(self, path: str, message: str, warning: str | None = None) -> None:
        """Keep `path` on the list of files left out; warn with `warning` (default: the message)."""
        warnings.warn(warning or message, BadImageWarning, stacklevel=3)
        self.skipped.append({"path": path, "reason": message})


def write_skipped_csv(path: Path, skipped: Sequence[dict[str, str]]) -> None:
    """`skipped_images.csv` (path, reason): every file the data source left out, one row each."""
    import csv
    import io

    from vision_si.rundir import atomic_write_text

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "reason"])
    writer.writerows([r["path"], r["reason"]] for r in skipped)
    atomic_write_text(path, buf.getvalue())


def drop_duplicates(hashes: Sequence[str], labels: Sequence[str], names: Sequence[str],
                    bad: BadImages, paths: Sequence[str] | None = None) -> list[int]:
    """Indices to keep; see step 2 of the module doc. `names` are how messages name each sample,
    `paths` how `skipped_images.csv` lists it (default: `names`)."""
    paths = names if paths is None else paths
    first: dict[str, int] = {}
    drop: set[int] = set()
    for i, h in enumerate(hashes):
        j = first.setdefault(h, i)
        if j == i:
            continue
        drop.add(i)
        if labels[i] != labels[j]:
            message = (f"{names[i]} (class '{labels[i]}') has the same bytes as {names[j]} "
                       f"(class '{labels[j]}'): one image cannot belong to two classes")
            if bad.on_bad_image == "error":
                raise DataError(message)
            bad.record(str(paths[i]), message, f"skipped: {message}")
            if j not in drop:  # the first file of the pair leaves too, and is listed once
                drop.add(j)
                bad.record(str(paths[j]), message, f"skipped: {names[j]} (see above)")
        else:
            bad.record(str(paths[i]), f"{names[i]} duplicates {names[j]} (same sha256, class '{labels[i]}'); "
                       "keeping only the first")
    return [i for i in range(len(hashes)) if i not in drop]


def table_from_files(records: Sequence[FileRecord], classes: Sequence[str], *, name: str,
                     alpha: str = "composite_black", on_bad_image: str = "error",
                     max_per_class: int | None = None, seed: int = 0, progress: bool = True,
                     bad: BadImages | None = None, dicom: DicomConfig | None = None,
                     hashes: Sequence[str] | None = None) -> SampleTable:
    """Hash, de-duplicate, cap and decode-check `records`; the result's loader decodes on demand.
    `dicom` sets how DICOM files are windowed (`vision_si.data.dicom`); `hashes`, when the caller has
    already hashed the files, are their sha256 in the order of `records`."""
    bad = bad or BadImages(on_bad_image)
    class_index = {c: k for k, c in enumerate(classes)}
    unknown = sorted({r.label for r in records} - set(class_index))
    if unknown:
        raise ValueError(f"records name classes not in the class list: {unknown}")
    if hashes is None:
        hashes = [sha256_file(r.path) for r in tqdm(records, desc=f"{name}: hashing", disable=not progress)]
    elif len(hashes) != len(records):
        raise ValueError(f"{len(hashes)} hashes for {len(records)} records")
    keep = drop_duplicates(hashes, [r.label for r in records], [r.where for r in records], bad,
                           [str(r.path) for r in records])
    labels = np.array([class_index[records[i].label] for i in keep], dtype=np.int64)
    keep = [keep[i] for i in cap_per_class(labels, max_per_class, seed)]

    rows: list[int] = []
    channels = 1
    failed: list[tuple[str, str]] = []
    with tqdm(keep, desc=f"{name}: checking images", disable=not progress) as bar:
        for i in bar:
            r = records[i]
            try:
                arr = decode_array(read_bytes(r.path), r.where, alpha, dicom)
            except DataError as exc:
                if bad.on_bad_image == "error":
                    raise  # the bar closes first, so the message gets a line of its own
                failed.append((str(r.path), str(exc)))
                continue
            channels = max(channels, arr.shape[2])
            rows.append(i)
    for path, message in failed:  # warned after the bar has closed, one line each
        bad.report(path, message)

    paths = [str(records[i].path) for i in rows]
    return SampleTable(
        ids=[records[i].id for i in rows],
        labels=np.array([class_index[records[i].label] for i in rows], dtype=np.int64),
        classes=list(classes),
        sources=paths,
        sha256=[hashes[i] for i in rows],
        groups=[records[i].group for i in rows],
        metadata=[dict(records[i].metadata) for i in rows],
        loader=FileLoader(tuple(paths), alpha, dicom),
        name=name,
        channels=channels,
        skipped=bad.skipped,
    )
