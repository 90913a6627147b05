"""Fast fault cases: a full disk or an unwritable run directory mid-run, and a second process on a
locked run directory. (SIGKILL at random points of every stage is `benchmarks/faults.py`.)

Tests run as root, where chmod does not stop writes, so the faults are injected in-process: `open`
raises ENOSPC / EROFS for paths under the run directory, exactly as the kernel would. Each case
checks the CLI's exit code and its one-line message naming the path, that the last complete stage
is intact, and that `vsi resume` completes once the fault is gone.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import vsi
from tiny_run import copy_run, make_run


@pytest.fixture(scope="module")
def diagnosed_run(tmp_path_factory):
    """A real tiny run stopped after round 0 (train and diagnose complete); generation in chunks of 4."""
    return make_run(tmp_path_factory.mktemp("faults"), until="diagnose", name="faults", generate={"batch_size": 4})


@pytest.fixture
def run_copy(diagnosed_run, tmp_path):
    return copy_run(diagnosed_run, tmp_path)


def fingerprint(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def failing_writes(monkeypatch, where: str, code: int, after: int = 0) -> list[str]:
    """Make `open(..., 'w'/'a'/'x')` of any path containing `where` fail with `code` after `after` successes."""
    real_open = builtins.open
    opened: list[str] = []

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and where in os.fspath(file) and any(m in mode for m in "wax"):
            opened.append(os.fspath(file))
            if len(opened) > after:
                raise OSError(code, os.strerror(code), os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    return opened


def test_disk_full_mid_stage_is_reported_and_the_last_complete_stage_is_intact(run_copy, capsys, monkeypatch):
    shutil.rmtree(run_copy / "round-00/diagnose")  # diagnose will run again, on a disk that fills up
    train_before = fingerprint(run_copy / "round-00/train")
    failing_writes(monkeypatch, "round-00/diagnose.tmp", errno.ENOSPC, after=2)
    code, err = vsi(capsys, "diagnose", run_copy, "--quiet")
    assert code == 2, err
    (line,) = err.strip().splitlines()
    assert "round-00/diagnose.tmp/" in line and ("disk full" in line or "No space left" in line), line
    assert fingerprint(run_copy / "round-00/train") == train_before
    assert not (run_copy / "round-00/diagnose").exists()  # never renamed as complete
    assert not (run_copy / "lock").exists()  # the lock is released on the way out
    monkeypatch.undo()
    code, err = vsi(capsys, "diagnose", run_copy, "--quiet")  # space freed: resume completes the stage
    assert code == 0, err
    assert (run_copy / "round-00/diagnose/diagnosis.json").is_file()
    assert fingerprint(run_copy / "round-00/train") == train_before


def test_disk_full_mid_generation_loses_no_image(run_copy, diagnosed_run, tmp_path, capsys, monkeypatch):
    reference = tmp_path / "reference"
    shutil.copytree(diagnosed_run, reference)
    code, err = vsi(capsys, "generate", reference, "--quiet")
    assert code == 0, err
    opened = failing_writes(monkeypatch, "round-01/generate.tmp/images/", errno.ENOSPC, after=3)
    code, err = vsi(capsys, "generate", run_copy, "--quiet")
    assert code == 2 and "generate.tmp/images/" in err, err
    assert len(opened) == 4  # three images written, the fourth hit the full disk
    monkeypatch.undo()
    code, err = vsi(capsys, "generate", run_copy, "--quiet")
    assert code == 0, err
    gen, ref = run_copy / "round-01/generate", reference / "round-01/generate"
    rows = [json.loads(line) for line in (gen / "manifest.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (ref / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in ref_rows]  # none lost, none twice
    assert [r["sha256"] for r in rows] == [r["sha256"] for r in ref_rows]  # same bytes as uninterrupted
    pngs = sorted(p.name for p in (gen / "images").glob("*.png"))
    assert pngs == sorted(Path(r["path"]).name for r in rows)
    for r in rows:
        assert hashlib.sha256((gen / r["path"]).read_bytes()).hexdigest() == r["sha256"]


def test_read_only_run_directory_is_refused_untouched(run_copy, capsys, monkeypatch):
    before = fingerprint(run_copy)
    real_os_open = os.open

    def read_only(path, flags, *args, **kwargs):  # what a read-only bind mount does to the lock file
        if str(run_copy) in os.fspath(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    failing_writes(monkeypatch, str(run_copy), errno.EROFS)
    code, err = vsi(capsys, "resume", run_copy, "--quiet")
    assert code == 2, err
    (line,) = err.strip().splitlines()
    assert str(run_copy) in line and "Read-only file system" in line, line
    monkeypatch.undo()
    assert fingerprint(run_copy) == before


def test_second_process_on_a_locked_run_directory_is_refused(run_copy, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (run_copy / "lock").write_text(str(holder.pid))
        before = fingerprint(run_copy)
        for command in ("resume", "generate", "filter"):
            code, err = vsi(capsys, command, run_copy, "--quiet")
            assert code == 2, err
            (line,) = err.strip().splitlines()
            assert f"in use by process {holder.pid}" in line and str(run_copy) in line, line
        assert fingerprint(run_copy) == before  # the refused processes changed nothing
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and the next process takes over
    code, err = vsi(capsys, "generate", run_copy, "--quiet")
    assert code == 0, err
    assert not (run_copy / "lock").exists()


def test_a_stage_command_with_no_such_stage_left_finishes_the_run_and_says_so(run_copy, capsys):
    """`vsi gate RUN` stops after the next gate; with none left it runs to the end and prints the result."""
    from cli_helpers import run_vsi

    code, err, out = run_vsi(capsys, "gate", run_copy, "--quiet")
    assert code == 0, err
    assert (run_copy / "round-01/gate/decision.json").is_file() and not (run_copy / "summary.json").exists()
    assert f"run directory: {run_copy}" in out
    code, err, out = run_vsi(capsys, "gate", run_copy, "--quiet")  # max_rounds 1: no gate left
    assert code == 0, err
    assert (run_copy / "summary.json").is_file()
    assert "no 'gate' stage was left to run: the run is complete" in err
    assert "test split" in out and "macro-F1" in out  # the result table, as `vsi run` prints it
