"""Experiment tracking with MLflow (the `tracking` extra): a run directory mirrored into an MLflow run.

Nothing here drives the loop. `MlflowTracker.sync()` reads the run directory's typed results
(`FilterResult`, `GateDecision`, the manifest, `summary.json`) and logs whatever is complete and not
logged yet; the loop calls it after every stage when `tracking.mlflow` is true (`track_run`), and
`log_run(run_dir)` mirrors a run directory after the fact. What was logged is recorded in the run
directory's `tracking.json` (tracking URI, experiment, MLflow run ids, logged items), so `vsi resume`
continues the same MLflow run and logs nothing twice.

In MLflow:

- **one parent run** per run directory, named after it, tagged `vision_si.run_dir`; its params are
  the resolved config flattened (`classifier.steps`, `gate.metric`, ...);
- **one nested run per round** (`round-01`, ...; tag `mlflow.parentRunId`): `generated`, the filter's
  `filter.candidates`, `filter.accepted` and `filter.rejected.<reason>`, and the gate's val metric on
  both sides (`val.baseline.<metric>`, `val.candidate.<metric>`, `val.delta.<metric>`, each with
  `_ci_low`/`_ci_high`) and `gate.accepted` (1 or 0; tag `gate.decision`), as `gate_metrics` maps
  them; artifacts `manifest.jsonl`, `scores.csv`, `decision.json`. The same metrics go to the parent
  with `step` = round, so MLflow draws them over rounds;
- **the final test metrics once**, on the parent: `test.baseline.*` and `test.final.*` (accuracy,
  balanced_accuracy, macro_f1, `recall.<class>`);
- **artifacts** of the parent: `config.yaml`, `summary.json`, `report.html`.

The default tracking URI is a SQLite store beside the runs, `sqlite:///<folder holding the run
directory>/mlflow.db`, with artifacts in `mlartifacts/` next to it; `mlflow ui --backend-store-uri
sqlite:///runs/mlflow.db` shows it. MLflow's usage telemetry is switched off (no network unasked).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vision_si.config import RunConfig, TrackingConfig, config_to_dict, load_config
from vision_si.errors import ConfigError, RunDirError
from vision_si.rundir import atomic_write_json, is_complete

# MLflow 3 sends usage telemetry unless told not to; vision_si reaches no network unasked.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

TRACKING_INSTALL = "install the `tracking` extra (`pip install mlflow`; in a checkout `pip install -e '.[tracking]'`)"
STATE_FILE = "tracking.json"
_KEY_CHARS = re.compile(r"[^\w\-. /]")  # what MLflow allows in a metric or param name


class TrackingWarning(UserWarning):
    """Logging to MLflow failed in the middle of a run; the run goes on and the next sync retries."""


def gate_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The gate's entry of summary.json (`GateDecision.summary()`) as MLflow metrics: the one place
    that knows its shape. `before` is the baseline side, `after` the side trained with the images."""
    out: dict[str, float] = {}
    decision = summary.get("decision")
    if decision in ("accepted", "rejected"):
        out["gate.accepted"] = float(decision == "accepted")
    metric = summary.get("metric") or "metric"
    for side, name in (("before", "baseline"), ("after", "candidate"), ("delta", "delta")):
        entry = summary.get(side)
        if not isinstance(entry, dict) or entry.get("value") is None:
            continue
        key = f"val.{name}.{metric}"
        out[key] = float(entry["value"])
        ci = entry.get("ci")
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci:
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = float(ci[0]), float(ci[1])
    return out


def final_test_metrics(test: dict[str, Any]) -> dict[str, float]:
    """summary.json's `test` section (baseline and final on `test`) as metrics."""
    out: dict[str, float] = {}
    for side in ("baseline", "final"):
        m = test.get(side) or {}
        for key in ("accuracy", "balanced_accuracy", "macro_f1"):
            if m.get(key) is not None:
                out[f"test.{side}.{key}"] = float(m[key])
        for cls, values in (m.get("per_class") or {}).items():
            if isinstance(values, dict) and values.get("recall") is not None:
                out[f"test.{side}.recall.{cls}"] = float(values["recall"])
    return out


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config mapping as `section.key` → text (MLflow params are strings)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


def _key(name: str) -> str:
    return _KEY_CHARS.sub("_", name)


def default_uri(run_dir: Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve().parent / 'mlflow.db'}"


class MlflowTracker:
    """Mirrors one run directory into MLflow. `start` opens (or reopens) the parent run, `sync` logs what
    is new, `close` ends the run with a status; see the module doc."""

    def __init__(self, run_dir: str | Path, cfg: TrackingConfig | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg or TrackingConfig(mlflow=True)

    # ------------------------------------------------------------------ state
    @property
    def state_path(self) -> Path:
        return self.run_dir / STATE_FILE

    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise RunDirError(f"'{self.state_path}' is not valid JSON ({exc}); delete it to start a new MLflow run") \
                from None
        return state if isinstance(state, dict) else {}

    def _save_state(self) -> None:
        atomic_write_json(self.state_path, {k: v for k, v in self.state_.items() if k != "open"})

    # ------------------------------------------------------------------ lifecycle
    def start(self, config: dict[str, Any]) -> MlflowTracker:
        """Connect to the store and find (or create) the experiment; a bad URI or a missing mlflow is a
        `ConfigError` now, before any work. The MLflow run itself opens with the first result to log."""
        try:
            from mlflow import MlflowClient
            from mlflow.exceptions import MlflowException
        except ImportError:
            raise ConfigError(f"tracking.mlflow is true but mlflow is not installed: {TRACKING_INSTALL}") from None
        self.config_ = config
        self.uri_ = self.cfg.uri or default_uri(self.run_dir)
        self.state_ = self._read_state()
        try:
            self.client_ = MlflowClient(tracking_uri=self.uri_)
            experiment = self.client_.get_experiment_by_name(self.cfg.experiment)
            if experiment is None:
                location = None
                if self.cfg.uri is None:  # keep artifacts beside the default store, not in the working directory
                    location = (self.run_dir.resolve().parent / "mlartifacts").as_uri()
                self.experiment_id_ = self.client_.create_experiment(self.cfg.experiment, artifact_location=location)
            else:
                self.experiment_id_ = experiment.experiment_id
        except MlflowException as exc:
            raise ConfigError(f"tracking.uri: cannot use the MLflow store {self.uri_}: {exc}") from None
        return self

    def _open_run(self) -> str:
        """The parent run: the one `tracking.json` names when this store has it (a moved run directory with its
        store keeps its run), else a new one with the params."""
        if self.state_.get("open"):
            return self.state_["run_id"]
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        run_id = self.state_.get("run_id")
        if run_id:
            try:
                self.client_.get_run(run_id)
            except MlflowException:
                warnings.warn(f"{self.state_path}: MLflow run {run_id} is not in {self.uri_}; starting a new one",
                              TrackingWarning, stacklevel=3)
                run_id = None
        if run_id:  # resume: the same MLflow run goes on
            self.client_.update_run(run_id, status="RUNNING")
            self.state_["uri"] = self.uri_
            self.state_.setdefault("rounds", {})
            self.state_.setdefault("logged", [])
        else:
            run = self.client_.create_run(self.experiment_id_, run_name=self.run_dir.name,
                                          tags={"vision_si.run_dir": str(self.run_dir.resolve())})
            run_id = run.info.run_id
            self.state_ = {"uri": self.uri_, "experiment_id": self.experiment_id_, "run_id": run_id,
                           "rounds": {}, "logged": []}
            params = [(_key(k), v[:6000]) for k, v in flat_params(self.config_).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client_.log_batch(run_id, params=[Param(k, v) for k, v in params[i:i + 100]])
        self._save_state()
        self.state_["open"] = True  # in memory only: this process has (re)opened the run
        return run_id

    @property
    def run_id(self) -> str:
        return self._open_run()

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run with `status` (FINISHED, FAILED, KILLED), if this process opened one."""
        if self.state_.get("open"):
            self.client_.set_tag(self.run_id, "vision_si.complete",
                                 str((self.run_dir / "summary.json").is_file()).lower())
            self.client_.set_terminated(self.run_id, status=status)

    # ------------------------------------------------------------------ logging
    def _done(self, item: str) -> bool:
        return item in self.state_.get("logged", [])

    def _mark(self, item: str) -> None:
        self.state_["logged"].append(item)
        self._save_state()

    def _metrics(self, run_id: str, values: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_key(k), float(v), now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client_.log_batch(run_id, metrics=metrics[i:i + 1000])

    def _round_run(self, r: int) -> str:
        rounds = self.state_["rounds"]
        if str(r) not in rounds:
            run = self.client_.create_run(self.experiment_id_, run_name=f"round-{r:02d}",
                                          tags={"mlflow.parentRunId": self.run_id, "vision_si.round": str(r)})
            rounds[str(r)] = run.info.run_id
            self._save_state()
        return rounds[str(r)]

    def _log_round(self, r: int) -> None:
        from vision_si.filter import FilterResult
        from vision_si.gate import GateDecision
        from vision_si.generators.runner import read_manifest

        tag = f"round-{r:02d}"
        rd = self.run_dir / tag
        for stage in ("generate", "filter", "gate"):
            if not is_complete(self.run_dir, f"{tag}/{stage}"):
                continue
            # a stage folder redone (the filter after a late review) has another mtime and is logged again
            item = f"{tag}/{stage}@{(rd / stage).stat().st_mtime_ns}"
            if self._done(item):
                continue
            run_id = self._round_run(r)
            if stage == "generate":
                values = {"generated": len(read_manifest(rd / "generate" / "manifest.jsonl"))}
                artifact = rd / "generate" / "manifest.jsonl"
            elif stage == "filter":
                result = FilterResult.load(rd / "filter")
                values = {"filter.candidates": len(result.rows), "filter.accepted": len(result.accepted_ids),
                          **{f"filter.rejected.{k}": v for k, v in result.rejected_counts().items()}}
                artifact = rd / "filter" / "scores.csv"
            else:
                summary = GateDecision.load(rd / "gate").summary()
                values = gate_metrics(summary)
                artifact = rd / "gate" / "decision.json"
                self.client_.set_tag(run_id, "gate.decision", str(summary.get("decision")))
            self._metrics(run_id, values)
            self._metrics(self.run_id, values, step=r)  # over rounds, on the parent
            self.client_.log_artifact(run_id, str(artifact))
            if stage == "gate":
                self.client_.set_terminated(run_id, status="FINISHED")
            self._mark(item)

    def sync(self, stage: str | None = None) -> None:
        """Log every complete result of the run directory not logged yet (rounds, test, artifacts). After a
        loop stage (`stage` named), the MLflow run is opened even when that stage has nothing to log."""
        if stage not in (None, "start", "end"):
            self._open_run()
        rounds = sorted(int(p.name[6:]) for p in self.run_dir.glob("round-[0-9][0-9]") if p.is_dir())
        for r in rounds:
            if r > 0:
                self._log_round(r)
        summary_path = self.run_dir / "summary.json"
        if not summary_path.is_file():
            return
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if not self._done("test") and isinstance(summary.get("test"), dict):
            self._metrics(self.run_id, final_test_metrics(summary["test"]))
            self._mark("test")
        if not self._done("artifacts") and (self.run_dir / "report.html").is_file():
            for name in ("config.yaml", "summary.json", "report.html"):
                if (self.run_dir / name).is_file():
                    self.client_.log_artifact(self.run_id, str(self.run_dir / name))
            self._mark("artifacts")


@contextlib.contextmanager
def track_run(cfg: RunConfig, run_dir: Path) -> Iterator[Callable[[str], None] | None]:
    """For the loop: with `tracking.mlflow`, open the run's MLflow run and yield a hook that logs after each
    stage (a failure to log warns and the run goes on); the run ends FINISHED, FAILED or KILLED. Without
    `tracking.mlflow` this yields None and imports nothing."""
    if not cfg.tracking.mlflow:
        yield None
        return
    tracker = MlflowTracker(run_dir, cfg.tracking).start(config_to_dict(cfg))

    def on_stage(stage: str) -> None:
        try:
            tracker.sync(stage)
        except Exception as exc:  # noqa: BLE001 - a tracking store hiccup must not cost a run its work
            warnings.warn(f"MLflow logging after {stage} failed ({type(exc).__name__}: {exc}); the run goes on "
                          "and the next stage retries", TrackingWarning, stacklevel=2)

    status = "FAILED"
    try:
        if tracker.state_path.exists():
            on_stage("start")  # resumed: what a killed process completed but did not log
        yield on_stage
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        on_stage("end")
        with contextlib.suppress(Exception):
            tracker.close(status)


def log_run(run_dir: str | Path, *, uri: str | None = None, experiment: str | None = None) -> str:
    """Mirror a run directory (finished or not) into MLflow after the fact; returns the MLflow run id.

    The tracking settings are the run's own (`config.yaml`), with `uri`/`experiment` replacing them; a run
    already logged continues its MLflow run and logs only what is new.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"'{run_dir}' is not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    tracking = TrackingConfig(mlflow=True, uri=uri if uri is not None else cfg.tracking.uri,
                              experiment=experiment or cfg.tracking.experiment)
    tracker = MlflowTracker(run_dir, tracking).start(config_to_dict(cfg))
    try:
        tracker.sync("log_run")
    finally:
        tracker.close("FINISHED")
    return tracker.run_id
