"""MLflow tracking (the `tracking` extra) against a real local SQLite store, read back with MlflowClient.

One tiny run with `tracking.mlflow: true` is stopped after its first filter stage, inspected, then
resumed to the end: the resumed process must continue the same MLflow run and log nothing twice.
"""

from __future__ import annotations

import json
import socket
import sys

import pytest
import yaml
from cli_helpers import vsi
from tiny_run import copy_run, make_run, tiny_config

mlflow = pytest.importorskip("mlflow", reason="the tracking extra (mlflow) is not installed")
from mlflow import MlflowClient  # noqa: E402

from vision_si.filter import FilterResult  # noqa: E402
from vision_si.gate import GateDecision  # noqa: E402
from vision_si.loop import resume  # noqa: E402
from vision_si.tracking import gate_metrics, log_run  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A tracked tiny run stopped after round-01/filter (the gate not run yet)."""
    folder = tmp_path_factory.mktemp("tracked")
    return make_run(folder, until="filter", tracking={"mlflow": True, "experiment": "tiny-tests"})


def store(run_dir) -> tuple[MlflowClient, str]:
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    return client, client.get_experiment_by_name("tiny-tests").experiment_id


def runs_of(client, experiment_id):
    runs = client.search_runs([experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_a_stopped_run_has_its_params_and_the_stages_done_so_far(stopped_run):
    state = json.loads((stopped_run / "tracking.json").read_text())
    client, exp = store(stopped_run)
    parents, children = runs_of(client, exp)
    assert [p.info.run_id for p in parents] == [state["run_id"]]
    parent = parents[0]
    assert parent.info.run_name == stopped_run.name and parent.info.status == "FINISHED"
    assert parent.data.tags["vision_si.complete"] == "false"
    params = parent.data.params
    assert params["classifier.steps"] == "4" and params["data.source"] == "digits"
    assert params["tracking.mlflow"] == "True" and params["gate.metric"] == "macro_auroc"
    assert len(children) == 1 and children[0].data.tags["mlflow.parentRunId"] == state["run_id"]
    metrics = children[0].data.metrics
    result = FilterResult.load(stopped_run / "round-01/filter")
    assert metrics["filter.accepted"] == len(result.accepted_ids)
    assert metrics["filter.candidates"] == len(result.rows) == metrics["generated"]
    assert not any(k.startswith(("val.", "gate.")) for k in metrics)  # no gate yet
    arts = {a.path for a in client.list_artifacts(children[0].info.run_id)}
    assert arts == {"manifest.jsonl", "scores.csv"}


def test_resume_continues_the_same_mlflow_run_and_logs_the_rest_once(stopped_run, tmp_path, monkeypatch):
    run = copy_run(stopped_run, tmp_path)  # the copy keeps its tracking.json: the store beside the original
    (run.parent / "mlflow.db").write_bytes((stopped_run.parent / "mlflow.db").read_bytes())
    before = json.loads((run / "tracking.json").read_text())
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access blocked by test_tracking")

    monkeypatch.setattr(socket.socket, "connect", refuse)  # MLflow must not phone home (telemetry)
    monkeypatch.setattr(socket, "create_connection", refuse)
    resume(run, progress=False, echo=lambda _m: None)
    assert attempts == []

    state = json.loads((run / "tracking.json").read_text())
    assert state["run_id"] == before["run_id"] and state["rounds"] == before["rounds"]
    client, exp = store(run)
    parents, children = runs_of(client, exp)
    assert len(parents) == 1 and len(children) == 1
    parent, child = parents[0], children[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["vision_si.complete"] == "true"
    assert len(client.get_metric_history(child.info.run_id, "filter.accepted")) == 1  # not logged twice

    decision = GateDecision.load(run / "round-01/gate")
    metric = decision.metric
    m = child.data.metrics
    assert m[f"val.baseline.{metric}"] == pytest.approx(decision.before.value)
    assert m[f"val.candidate.{metric}"] == pytest.approx(decision.after.value)
    assert m[f"val.delta.{metric}_ci_low"] == pytest.approx(decision.delta.ci[0])
    if decision.decision in ("accepted", "rejected"):
        assert m["gate.accepted"] == float(decision.accepted)
    assert child.data.tags["gate.decision"] == decision.decision
    assert child.info.status == "FINISHED"
    history = client.get_metric_history(parent.info.run_id, "filter.accepted")
    assert [h.step for h in history] == [1]  # the parent draws round metrics over rounds

    summary = json.loads((run / "summary.json").read_text())
    pm = parent.data.metrics
    for side in ("baseline", "final"):
        assert pm[f"test.{side}.macro_f1"] == pytest.approx(summary["test"][side]["macro_f1"])
        assert pm[f"test.{side}.recall.3"] == pytest.approx(summary["test"][side]["per_class"]["3"]["recall"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"config.yaml", "summary.json",
                                                                            "report.html"}
    assert {a.path for a in client.list_artifacts(child.info.run_id)} == {"manifest.jsonl", "scores.csv",
                                                                           "decision.json"}
    # mirroring the finished run again adds nothing: same run, one test metric each
    assert log_run(run) == state["run_id"]
    assert len(client.get_metric_history(parent.info.run_id, "test.final.macro_f1")) == 1


def test_nothing_is_logged_unless_asked(tmp_path):
    run = make_run(tmp_path, until="train")
    assert not (run / "tracking.json").exists()
    assert not (run.parent / "mlflow.db").exists() and not (run.parent / "mlartifacts").exists()


def test_missing_mlflow_stops_the_run_with_the_install_hint(tmp_path, capsys, monkeypatch):
    config = tmp_path / "tracked.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path, tracking={"mlflow": True})))
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as on an install without the extra
    code, err = vsi(capsys, "run", config, "--quiet")
    assert code == 2 and "tracking.mlflow" in err and "pip install -e '.[tracking]'" in err
    assert not list((tmp_path / "runs").glob("*"))


def test_an_unusable_store_is_refused_before_any_work(tmp_path, capsys):
    config = tmp_path / "tracked.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path, tracking={"mlflow": True, "uri": "nosuchscheme://x"})))
    code, err = vsi(capsys, "run", config, "--quiet")
    assert code == 2 and "tracking.uri" in err and "nosuchscheme://x" in err


def test_gate_metrics_maps_both_sides_and_the_decision():
    summary = {"decision": "rejected", "metric": "macro_f1", "before": {"value": 0.6, "ci": [0.5, 0.7]},
               "after": {"value": 0.62, "ci": [0.52, 0.72]}, "delta": {"value": 0.02, "ci": [-0.03, 0.07]}}
    m = gate_metrics(summary)
    assert m["gate.accepted"] == 0.0
    assert (m["val.baseline.macro_f1"], m["val.candidate.macro_f1"], m["val.delta.macro_f1"]) == (0.6, 0.62, 0.02)
    assert (m["val.delta.macro_f1_ci_low"], m["val.delta.macro_f1_ci_high"]) == (-0.03, 0.07)
    assert gate_metrics({"decision": "skipped", "metric": "macro_f1"}) == {}
