"""The run directory: creation, the lock, atomic files, stage folders, the event log, and the split's record.

A stage writes into `<stage>.tmp/` and is renamed to `<stage>/` when complete, so a folder without
the suffix is always whole. Stages that can resume their own work (training, generation) are
handed their `.tmp` folder back after a crash; the others start it afresh.

`splits.csv` is written with its sha256 in `splits.sha256` (`write_splits_record`), and every later
process checks it before any work (`check_splits_record`): an edited split is an
`EvaluationInvariantError`, since the split decides what `test` is.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vision_si.errors import EvaluationInvariantError, RunDirError


def new_run_dir(output_dir: str | Path, name: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir) / f"{stamp}-{name}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    try:
        path.mkdir(parents=True)
    except OSError as exc:
        raise RunDirError(f"cannot create run directory '{path}': {exc.strerror}") from None
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader (or a kill) only ever sees the old file or the whole new one:
    the one home of atomic files. `<name>.tmp` beside it is fsync'd, then renamed over `path`; a `.tmp`
    left by a kill is overwritten when the file is written again."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RunDirError(f"disk full while writing '{path}'; the last complete stage is intact") from None
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise RunDirError(f"cannot write '{path}': {exc.strerror}") from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"'{path}' is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(f"'{path}' is not valid JSON: {exc}") from None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PidLock:
    """A lock file holding its owner's pid: the one pid-file lock of the package.

    `try_acquire` creates the file exclusively and writes the pid; when the file exists, its holder
    keeps it while its process lives, and a lock left by a process that is gone (or an empty file
    older than `EMPTY_GRACE_S`: killed between creating and writing it) is stale and taken over.
    """

    EMPTY_GRACE_S = 10.0  # an empty lock file younger than this is being written by its owner

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._held = False

    def holder(self) -> int | None:
        """The pid holding the lock (0: being written right now), or None when it is free or stale."""
        try:
            text = self.path.read_text().strip()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            return None
        if not text:
            return 0 if age < self.EMPTY_GRACE_S else None
        try:
            pid = int(text)
        except ValueError:
            return None
        return pid if pid > 0 and pid != os.getpid() and pid_alive(pid) else None

    def try_acquire(self) -> int | None:
        """Take the lock and return None, or return the pid of the live process holding it."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = self.holder()
                if pid is not None:
                    return pid
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            self._held = True
            return None
        pid = self.holder()
        return pid if pid is not None else 0

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False


class RunLock(PidLock):
    """The run directory's `lock`; a second process on the same run directory refuses to start."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(Path(run_dir) / "lock")

    def acquire(self) -> RunLock:
        try:
            pid = self.try_acquire()
        except OSError as exc:
            raise RunDirError(f"cannot lock run directory '{self.path.parent}': {exc.strerror}") from None
        if pid is not None:
            raise RunDirError(f"run directory '{self.path.parent}' is in use by process {pid} "
                              f"(lock file {self.path}); wait for it or stop it")
        return self

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class EventLog:
    """Append-only `events.jsonl`: stage starts/ends with elapsed seconds, and reads of `test`."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "events.jsonl"

    def write(self, event: str, **fields: Any) -> None:
        row = {"time": _dt.datetime.now().isoformat(timespec="seconds"), "event": event, **fields}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, default=_json_default) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a crash is skipped
                rows.append(json.loads(line))
        return rows

    def timings(self) -> dict[str, float]:
        """Seconds per completed stage (the last completion counts, resumed stages included)."""
        out: dict[str, float] = {}
        for row in self.read():
            if row.get("event") == "stage_done":
                out[row["stage"]] = round(float(row.get("seconds", 0.0)), 3)
        return out


def is_complete(run_dir: Path, stage: str) -> bool:
    return (Path(run_dir) / stage).is_dir()


@contextlib.contextmanager
def stage_dir(run_dir: Path, stage: str, *, keep_partial: bool = False) -> Iterator[Path]:
    """Yield `<stage>.tmp/`; rename it to `<stage>/` when the body finishes without error.

    With `keep_partial`, a `.tmp` folder left by a crash is handed back so the stage can resume its
    own work (training checkpoints, generated images); otherwise it is discarded and redone.
    """
    final = Path(run_dir) / stage
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists() and not keep_partial:
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create '{tmp}': {exc.strerror}") from None
    yield tmp
    os.replace(tmp, final)


SPLITS_FILE = "splits.csv"
SPLITS_DIGEST = "splits.sha256"  # sha256 of splits.csv as the run made it, in `sha256sum` format


def write_splits_record(run_dir: Path, text: str) -> None:
    """Write `splits.csv` and its digest; the digest goes first, so a kill between the two leaves a
    digest without a file (the split is remade, and must match it), never a file without a digest."""
    run_dir = Path(run_dir)
    recorded = _recorded_splits_digest(run_dir)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if recorded is not None and recorded != digest:
        raise EvaluationInvariantError(
            f"{run_dir / SPLITS_FILE}: is missing, and the split made again from the data differs from the one "
            f"this run recorded in {SPLITS_DIGEST} (sha256 {digest[:12]}…, recorded {recorded[:12]}…); "
            "the data or the split settings changed, so the run is stopped")
    atomic_write_text(run_dir / SPLITS_DIGEST, f"{digest}  {SPLITS_FILE}\n")
    atomic_write_text(run_dir / SPLITS_FILE, text)


def _recorded_splits_digest(run_dir: Path) -> str | None:
    path = Path(run_dir) / SPLITS_DIGEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluationInvariantError(f"{path}: cannot read the recorded digest of {SPLITS_FILE} ({exc}); "
                                       "the run is stopped") from None
    digest = text.split()[0] if text.split() else ""
    if len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest):
        raise EvaluationInvariantError(f"{path}: not a sha256 digest of {SPLITS_FILE}; the run is stopped")
    return digest


def check_splits_record(run_dir: Path) -> bool:
    """Whether the run has its `splits.csv`; when it has, the file must still have the digest recorded
    when the run made it. Any edit (a row moved between splits, a row added or removed) is an
    `EvaluationInvariantError` naming the file: the split decides what `test` is."""
    run_dir = Path(run_dir)
    path = run_dir / SPLITS_FILE
    if not path.exists():
        return False
    recorded = _recorded_splits_digest(run_dir)
    if recorded is None:
        raise EvaluationInvariantError(f"{path}: its digest ({SPLITS_DIGEST}, written when the run made the split) "
                                       "is missing, so the split cannot be verified; the run is stopped")
    try:
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise RunDirError(f"cannot read '{path}': {exc.strerror}") from None
    if actual != recorded:
        raise EvaluationInvariantError(
            f"{path}: changed since the run made it (sha256 {actual[:12]}…, recorded {recorded[:12]}… in "
            f"{SPLITS_DIGEST}); the split decides what val and test are, so the run is stopped")
    return True


def environment_info(seed: int, device: str, version: str) -> dict[str, Any]:
    """env.json: `version` (vision_si's), Python, platform, the main libraries' versions, device, seed, argv."""
    versions = {}
    for mod in ("torch", "torchvision", "timm", "diffusers", "albumentations", "sklearn", "numpy", "PIL"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - an optional module missing is not an error here
            versions[mod] = None
    return {"vision_si": version, "python": sys.version.split()[0], "platform": platform.platform(),
            "versions": versions, "device": device, "seed": seed, "argv": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
