"""The closed loop end to end on a tiny real dataset (scikit-learn digits), and resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_run import tiny_config as tiny_dict

from vision_si.config import config_from_dict
from vision_si.errors import EvaluationInvariantError


def tiny_config(tmp_path: Path, **changes):
    """configs/tiny.yaml as it is (two rounds), with runs and caches under `tmp_path`."""
    return config_from_dict(tiny_dict(tmp_path, fast=False, **changes))


def metrics_of(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    return {"test": s["test"], "rounds": [{k: r[k] for k in ("generated", "accepted_by_filter", "rejected_by_filter")}
                                          | {"gate": r["gate"]["decision"]} for r in s["rounds"]]}


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # same threads, same floats


def vsi(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "vision_si.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from vision_si.config import save_config

    tmp = tmp_path_factory.mktemp("loop")
    cfg = tiny_config(tmp, loop={"max_rounds": 1})  # one round keeps the kill tests' runs short
    save_config(cfg, tmp / "tiny.yaml")
    start = time.time()
    out = vsi("run", str(tmp / "tiny.yaml"), "--quiet")
    assert out.returncode == 0, out.stderr
    (run_dir,) = list((tmp / "runs").iterdir())
    return tmp, cfg, run_dir, time.time() - start


def test_loop_runs_end_to_end_and_writes_the_contract_files(finished_run):
    _tmp, _cfg, run_dir, _seconds = finished_run
    for name in ("config.yaml", "env.json", "splits.csv", "summary.json", "report.html", "events.jsonl"):
        assert (run_dir / name).is_file(), name
    for stage in ("round-00/train", "round-00/diagnose", "round-01/generate", "round-01/filter", "round-01/gate",
                  "final"):
        assert (run_dir / stage).is_dir(), stage
    # the thread count is part of what makes a CPU run reproducible (ENV runs it with OMP_NUM_THREADS=1)
    assert json.loads((run_dir / "env.json").read_text())["cpu_threads"] == 1
    s = json.loads((run_dir / "summary.json").read_text())
    assert set(s) >= {"dataset", "classes", "rounds", "test", "timings_s", "synthetic_in_eval_splits"}
    assert s["synthetic_in_eval_splits"] == 0
    assert len(s["classes"]) == 10
    r1 = s["rounds"][0]
    assert r1["generated"] == 24
    assert r1["accepted_by_filter"] + sum(r1["rejected_by_filter"].values()) == r1["generated"]
    assert r1["gate"]["decision"] in ("accepted", "rejected")
    for side in ("baseline", "final"):
        assert set(s["test"][side]) >= {"accuracy", "balanced_accuracy", "macro_f1", "per_class"}
    # synthetic ids never appear in splits.csv, which lists real images only
    splits = (run_dir / "splits.csv").read_text()
    assert "syn-" not in splits


def test_test_split_is_evaluated_exactly_once(finished_run):
    _tmp, _cfg, run_dir, _s = finished_run
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "test_evaluated" for e in events) == 1
    last_other = max(i for i, e in enumerate(events) if e["event"] == "stage_start" and e["stage"] != "final")
    first_test = next(i for i, e in enumerate(events) if e["event"] == "test_evaluated")
    assert first_test > last_other


def test_invariant_trips_when_a_synthetic_image_is_put_into_val(finished_run):
    from vision_si.config import load_config
    from vision_si.loop import Loop

    _tmp, _cfg, run_dir, _s = finished_run
    st = Loop(load_config(run_dir / "config.yaml"), run_dir, progress=False, echo=lambda _m: None).prepare()
    val_id = st.data.ids("val")[0]
    with pytest.raises(EvaluationInvariantError, match="synthetic"):
        st.guard.no_synthetic_in_eval(["syn-r01-000000", val_id])
    val_sha = st.data.sha256("test")[0]
    with pytest.raises(EvaluationInvariantError):
        st.guard.no_synthetic_in_eval(["syn-r01-000001"], [val_sha])
    assert st.guard.no_synthetic_in_eval(["syn-r01-000002"], ["0" * 64]) == 0


def _kill_when(run_dir_parent: Path, pattern: str, proc: subprocess.Popen, timeout: float = 240,
               sig: int = signal.SIGKILL) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if list(run_dir_parent.glob(pattern)):
            os.kill(proc.pid, sig)
            proc.wait()
            return True
        time.sleep(0.02)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["*/round-01/generate.tmp/images/*.png", "*/round-01/gate.tmp/*"])
def test_kill_then_resume_reproduces_the_uninterrupted_run(finished_run, tmp_path, pattern):
    _tmp, cfg, reference, _s = finished_run
    # same data cache (no re-decoding) and generator cache (no retraining); its own run directory
    cfg_path = tmp_path / "tiny.yaml"
    data = yaml.safe_load((reference / "config.yaml").read_text())
    data["output_dir"] = str(tmp_path / "runs")
    cfg_path.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen([sys.executable, "-m", "vision_si.cli", "run", str(cfg_path), "--quiet"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = _kill_when(tmp_path / "runs", pattern, proc)
    assert killed, "the run finished before the kill point was reached"
    (run_dir,) = list((tmp_path / "runs").iterdir())
    assert not (run_dir / "summary.json").exists()
    out = vsi("resume", str(run_dir), "--quiet")
    assert out.returncode == 0, out.stderr
    assert metrics_of(run_dir) == metrics_of(reference)
    # no image lost or duplicated: manifest rows and files agree one to one
    gen = run_dir / "round-01/generate"
    rows = [json.loads(line) for line in (gen / "manifest.jsonl").read_text().splitlines()]
    assert len({r["id"] for r in rows}) == len(rows) == 24
    assert sorted(p.name for p in (gen / "images").iterdir()) == sorted(Path(r["path"]).name for r in rows)


@pytest.mark.slow
def test_ctrl_c_exits_130_with_the_resume_hint_and_resume_finishes_the_run(finished_run, tmp_path):
    """Ctrl-C (SIGINT) is not a success: exit 130, one line saying how to continue, no traceback."""
    _tmp, cfg, reference, _s = finished_run
    data = yaml.safe_load((reference / "config.yaml").read_text())
    data["output_dir"] = str(tmp_path / "runs")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(data))
    proc = subprocess.Popen([sys.executable, "-m", "vision_si.cli", "run", str(tmp_path / "tiny.yaml"), "--quiet"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _kill_when(tmp_path / "runs", "*/round-01/generate.tmp/images/*.png", proc, sig=signal.SIGINT), \
        "the run finished before the interrupt point was reached"
    err = proc.stderr.read()
    assert proc.returncode == 130, err
    (run_dir,) = list((tmp_path / "runs").iterdir())
    assert "interrupted" in err and f"vsi resume {run_dir}" in err and "Traceback" not in err
    assert not (run_dir / "summary.json").exists()
    out = vsi("resume", str(run_dir), "--quiet")
    assert out.returncode == 0, out.stderr
    assert metrics_of(run_dir) == metrics_of(reference)


def test_threads_setting_limits_torch_during_the_run_and_restores_it(tmp_path, monkeypatch):
    """`threads: 1` holds for the whole run (torch and the BLAS pools) and is undone afterwards."""
    import torch
    from threadpoolctl import threadpool_info

    from vision_si import loop

    seen = {}

    def fake_run(self):
        seen["torch"] = torch.get_num_threads()
        seen["pools"] = {p["num_threads"] for p in threadpool_info()}
        return self.run_dir

    monkeypatch.setattr(loop.Loop, "run", fake_run)
    original = torch.get_num_threads()
    torch.set_num_threads(2)  # a setting the run must change and give back
    before = torch.get_num_threads()
    cfg = tiny_config(tmp_path)
    cfg.threads = 1
    loop.run_loop(cfg, progress=False, echo=lambda m: None)
    assert seen["torch"] == 1 and seen["pools"] == {1}, seen  # numpy's BLAS pool at least is present
    assert torch.get_num_threads() == before
    cfg.threads = None
    loop.run_loop(cfg, tmp_path / "other", progress=False, echo=lambda m: None)
    torch.set_num_threads(original)
    assert seen["torch"] == before, "null leaves torch's own setting alone"


def test_three_rounds_accept_reject_adapt_and_stop_on_patience(tmp_path, monkeypatch):
    """Round 1 accepted (its images join the pool and a new model and diagnosis replace the old), round 2
    rejected, round 3 the adapted retry (half the images, strength × 0.7) rejected: patience 2 stops the run
    before `max_rounds` 4. The gate's statistics run for real; only its verdict is forced, per round. The
    report and summary.json then read the same typed round results."""
    from tiny_run import tiny_config as tiny

    import vision_si.gate.training as gate
    from vision_si.filter import FilterResult
    from vision_si.generators.runner import read_manifest
    from vision_si.loop import run_loop
    from vision_si.report import write_report
    from vision_si.summary import read_rounds

    verdicts = iter([True, False, False])
    real_decide = gate.decide

    def forced(*args, **kwargs):
        d = real_decide(*args, **kwargs)
        d.accepted = next(verdicts)
        d.reason = f"forced {'accept' if d.accepted else 'reject'} by the test (the gate said: {d.reason})"
        return d

    monkeypatch.setattr(gate, "decide", forced)
    # every candidate but a leak passes the filter, so each round has images for the gate and the pool
    cfg = config_from_dict(tiny(tmp_path, name="rounds", loop={"max_rounds": 4, "patience": 2},
                                filter={"enabled": []}, diagnose={"budget_total": 12}))
    lines: list[str] = []
    rd = run_loop(cfg, progress=False, echo=lines.append)

    summary = json.loads((rd / "summary.json").read_text())
    assert [r["gate"]["decision"] for r in summary["rounds"]] == ["accepted", "rejected", "rejected"]
    assert "stopping: 2 rejected round(s) in a row (patience 2)" in lines and not (rd / "round-04").exists()
    # round 1 joined the pool: the later gates trained with it, and its model and diagnosis took over
    accepted = FilterResult.load(rd / "round-01/filter").accepted_ids
    assert accepted
    for r in (2, 3):
        training = json.loads((rd / f"round-{r:02d}/gate/decision.json").read_text())["training"]
        assert training["n_pool"] == len(accepted)
    assert (rd / "round-01/diagnose").is_dir() and not (rd / "round-02/diagnose").exists()
    assert json.loads((rd / "final/test.json").read_text())["final"]["model"].endswith("round-01/gate/candidate-0")
    # round 3 is round 2's request adapted: each allocation's count × 0.5 (rounded), strength × 0.7
    def per_slice(r):
        rows = read_manifest(rd / f"round-{r:02d}/generate/manifest.jsonl")
        out = {}
        for row in rows:
            n, strengths = out.get((row.class_index, row.slice), (0, set()))
            out[(row.class_index, row.slice)] = (n + 1, strengths | {row.strength})
        return out

    second, third = per_slice(2), per_slice(3)
    assert {k: round(n * 0.5) for k, (n, _) in second.items() if round(n * 0.5)} == {k: n for k, (n, _) in third.items()}
    for k, (_, strengths) in third.items():
        (before,), (after,) = second[k][1], strengths
        assert before is None or after == pytest.approx(before * 0.7)
    # one typed reader for both: summary.json's rounds are the records', and the report shows them even
    # when summary.json is edited afterwards
    records = read_rounds(rd)
    assert [rec.summary() for rec in records] == summary["rounds"]
    edited = dict(summary, rounds=[dict(r, generated=999) for r in summary["rounds"]])
    (rd / "summary.json").write_text(json.dumps(edited))
    text = write_report(rd).read_text()
    for rec in records:
        assert f"<td>{rec.round:02d}</td><td>{len(rec.manifest)}</td><td>{len(rec.filter.accepted_ids)}</td>" in text
    assert "<td>999</td>" not in text
