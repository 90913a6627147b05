"""The run directory: creation, the lock, atomic files, stage folders and the event log.

A stage writes into `<stage>.tmp/` and is renamed to `<stage>/` when complete, so a folder without
the suffix is always whole. Stages that can resume their own work (training, generation) are
handed their `.tmp` folder back after a crash; the others start it afresh.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vision_si.errors import RunDirError


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
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
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


class RunLock:
    """An exclusive lock file; a second process on the same run directory refuses to start."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "lock"
        self._held = False

    def acquire(self) -> RunLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and pid_alive(pid):
                    raise RunDirError(f"run directory '{self.path.parent}' is in use by process {pid} "
                                      f"(lock file {self.path}); wait for it or stop it") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            except OSError as exc:
                raise RunDirError(f"cannot lock run directory '{self.path.parent}': {exc.strerror}") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            self._held = True
            return self
        raise RunDirError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

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


def environment_info(seed: int, device: str) -> dict[str, Any]:
    versions = {}
    for mod in ("torch", "torchvision", "timm", "diffusers", "albumentations", "sklearn", "numpy", "PIL"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - an optional module missing is not an error here
            versions[mod] = None
    from vision_si import __version__

    return {"vision_si": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "versions": versions, "device": device, "seed": seed, "argv": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
