"""Run-directory mechanics: the lock, atomic stage folders, the event log."""

import multiprocessing as mp
import os

import pytest

from vision_si.errors import RunDirError
from vision_si.rundir import EventLog, RunLock, atomic_write_json, is_complete, read_json, stage_dir


def _hold_lock(run_dir, ready, release):
    with RunLock(run_dir):
        ready.set()
        release.wait(10)


def test_second_process_is_refused_while_the_first_holds_the_lock(tmp_path):
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    proc.start()
    try:
        assert ready.wait(20)
        with pytest.raises(RunDirError, match="in use by process"):
            RunLock(tmp_path).acquire()
    finally:
        release.set()
        proc.join(10)
    with RunLock(tmp_path):  # free again once the first process is done
        assert (tmp_path / "lock").read_text() == str(os.getpid())
    assert not (tmp_path / "lock").exists()


def test_a_stale_lock_from_a_dead_process_is_taken_over(tmp_path):
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=os.getpid)
    proc.start()
    proc.join()
    (tmp_path / "lock").write_text(str(proc.pid))
    with RunLock(tmp_path):
        assert (tmp_path / "lock").read_text() == str(os.getpid())


def test_stage_folder_appears_only_when_its_body_completes(tmp_path):
    with pytest.raises(RuntimeError), stage_dir(tmp_path, "round-01/filter") as tmp:
        (tmp / "half.csv").write_text("x")
        raise RuntimeError("crash")
    assert not is_complete(tmp_path, "round-01/filter")
    assert (tmp_path / "round-01/filter.tmp/half.csv").exists()
    with stage_dir(tmp_path, "round-01/filter") as tmp:  # not resumable: the partial folder is discarded
        assert not (tmp / "half.csv").exists()
        (tmp / "scores.csv").write_text("ok")
    assert is_complete(tmp_path, "round-01/filter")
    assert (tmp_path / "round-01/filter/scores.csv").read_text() == "ok"


def test_resumable_stage_gets_its_partial_folder_back(tmp_path):
    with pytest.raises(RuntimeError), stage_dir(tmp_path, "round-01/generate", keep_partial=True) as tmp:
        (tmp / "img-1.png").write_bytes(b"1")
        raise RuntimeError("killed")
    with stage_dir(tmp_path, "round-01/generate", keep_partial=True) as tmp:
        assert (tmp / "img-1.png").read_bytes() == b"1"


def test_event_log_timings_and_torn_last_line(tmp_path):
    log = EventLog(tmp_path)
    log.write("stage_done", stage="round-00/train", seconds=1.5)
    log.write("stage_done", stage="round-00/diagnose", seconds=0.25)
    with open(log.path, "a") as fh:
        fh.write('{"event": "stage_do')  # a line cut by a crash
    assert log.timings() == {"round-00/train": 1.5, "round-00/diagnose": 0.25}


def test_atomic_json_round_trip_and_clear_error_for_garbage(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": [1, 2]})
    assert read_json(tmp_path / "a.json") == {"x": [1, 2]}
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(RunDirError, match="b.json"):
        read_json(tmp_path / "b.json")
