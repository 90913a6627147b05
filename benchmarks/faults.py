"""SIGKILL a tiny run at random points of every stage, resume it each time, and check nothing was lost.

One uninterrupted reference run (the tiny digits config, `configs/tiny.yaml`: 16 px, resnet10t, the
`tiny` generator preset), then `--scenarios` killed runs of the same config and seed, each in its
own folder with its own (cold) generator cache, so kills land in the generator's own training.
Each scenario has a plan of kills per phase (`plan_for`):

- `resume-setup` (3 per scenario): a `vsi resume` process killed during its set-up (imports, data
  loading, the digest and invariant checks, loading the complete stages' models), before it reaches
  a stage with work left: a kill during a resume;
- every stage of the reference run (`round-00/train`, `round-00/diagnose`, `round-NN/generate`,
  `round-NN/filter`, `round-NN/gate`, ... `final`): 3 in round 0's training and round 1's gate, 2 in
  round 1's generation, 1 in the others;
- `generator-training` (2): round 1's generate stage while the generator trains (the cache holds no
  trained generator yet), so the partial training checkpoint (`<key>.partial/`) is resumed;
- `report`: summary.json and report.html after the last stage.

The next process (`vsi run` the first time, `vsi resume RUN` after) is watched through
`events.jsonl`; once the earliest phase with kills left has started, it is SIGKILLed after a random
delay drawn (seeded) from [0, 0.5 × that phase's duration in the reference run] (for round 1's
generation, its sampling part: the generator is trained by then). Where a kill actually landed is
read back from the events and the generator cache, not assumed (under a varying machine load a kill can overshoot into the next
stage; a phase completed that way loses its remaining kills, listed as `missed`). After the last
kill, `vsi resume` runs to completion.

Checks per scenario: the last `vsi resume` exits 0; summary.json's test metrics and per-round
counts and gate decisions equal the reference's; every checkpoint and every generated PNG of every
round is byte-identical to the reference's (the generator's weights too, through each manifest
row's generator sha256); manifest rows and image files agree one to one (no image lost, none twice)
and every sha256 checks; no `.tmp` stage folder, temp file, lock or partial generator training is
left; `test` was evaluated once. While the reference runs, a second `vsi resume` on its directory
must be refused (exit 2, "in use by process").

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/faults.py [--scenarios 8] [--seed 0]

Prints the figures and writes benchmarks/results/faults.json and faults.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # same threads, same floats
TINY = {**yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text()), "name": "faults"}
FIRST_ROUND = {"round-00/train": 3, "round-00/diagnose": 1, "generator-training": 2, "round-01/generate": 2,
               "round-01/filter": 1, "round-01/gate": 3}  # kills per phase in one scenario; others get 1
SPECIAL = {"resume-setup": 3, "report": 1}


def phase_order(stages: list[str]) -> list[str]:
    """The phases in run order: the reference's stages, generator training just before round 1's
    generate stage finishes (it is that stage's first part), then the report."""
    order = []
    for stage in stages:
        if stage == "round-01/generate":
            order.append("generator-training")
        order.append(stage)
    return [*order, "report"]


def plan_for(stages: list[str]) -> dict[str, int]:
    """Kills per phase in one scenario (a stage's second kill hits its resumed work)."""
    return {"resume-setup": SPECIAL["resume-setup"],
            **{p: FIRST_ROUND.get(p, SPECIAL.get(p, 1)) for p in phase_order(stages)}}


def write_config(folder: Path) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["output_dir"] = str(folder / "runs")
    cfg["data"]["cache_dir"] = str(folder / "cache")
    cfg["generate"]["cache_dir"] = str(folder / "cache" / "generators")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def launch(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vision_si.cli", *args, "--quiet"], env=ENV, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


class Events:
    """New lines of a run's events.jsonl since this watcher was made (the run folder may not exist yet)."""

    def __init__(self, runs: Path, run_dir: Path | None) -> None:
        self.runs, self.run_dir = runs, run_dir
        self.offset = self._path().stat().st_size if run_dir and self._path().exists() else 0
        self.rows: list[dict] = []

    def _path(self) -> Path:
        return self.run_dir / "events.jsonl"  # type: ignore[operator]

    def poll(self) -> list[dict]:
        if self.run_dir is None:
            found = [p for p in self.runs.glob("*") if p.is_dir()] if self.runs.exists() else []
            if not found:
                return self.rows
            self.run_dir = found[0]
        path = self._path()
        if not path.exists():
            return self.rows
        with open(path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        cut = data.rfind(b"\n") + 1
        self.offset += cut
        for line in data[:cut].decode().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by the kill
                self.rows.append(json.loads(line))
        return self.rows


def open_stage(rows: list[dict]) -> str | None:
    """The stage started and not finished in `rows`; 'report' after `final` completed."""
    current = None
    for e in rows:
        if e.get("event") == "stage_start":
            current = e["stage"]
        elif e.get("event") == "stage_done":
            current = "report" if e["stage"] == "final" else None
    return current


def generator_trained(folder: Path) -> bool:
    """Whether the scenario's generator cache holds a trained generator (its training is over)."""
    return any((folder / "cache" / "generators").glob("*/meta.json"))


def reference_run(folder: Path) -> dict:
    """The uninterrupted run; records when each event appeared, and tries a second process on its lock."""
    cfg = write_config(folder)
    t0 = time.perf_counter()
    proc = launch("run", str(cfg))
    events = Events(folder / "runs", None)
    seen: dict[str, float] = {}
    stages: list[str] = []
    second, lock_check = None, None
    while proc.poll() is None:
        for e in events.poll():
            key = f"{e['event']}:{e.get('stage', '')}"
            seen.setdefault(key, time.perf_counter() - t0)
            if e["event"] == "stage_start" and e["stage"] not in stages:
                stages.append(e["stage"])
        if "generator_trained" not in seen and generator_trained(folder):
            seen["generator_trained"] = time.perf_counter() - t0
        if second is None and "stage_start:round-00/train" in seen:
            second = subprocess.Popen([sys.executable, "-m", "vision_si.cli", "resume", str(events.run_dir), "--quiet"],
                                      env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if second is not None and lock_check is None and second.poll() is not None:
            lock_check = {"exit_code": second.returncode, "stderr": second.stderr.read().strip(),
                          "first_still_running": proc.poll() is None}
        time.sleep(0.005)
    if second is not None and lock_check is None:
        second.wait()
        lock_check = {"exit_code": second.returncode, "stderr": second.stderr.read().strip(),
                      "first_still_running": False}
    end = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"reference run failed: {proc.stderr.read()}")
    for e in events.poll():
        seen.setdefault(f"{e['event']}:{e.get('stage', '')}", end)
        if e["event"] == "stage_start" and e["stage"] not in stages:
            stages.append(e["stage"])
    durations = {s: seen[f"stage_done:{s}"] - seen[f"stage_start:{s}"] for s in stages}
    durations["resume-setup"] = seen["stage_start:round-00/train"]  # a fresh process up to its first stage
    durations["generator-training"] = seen.get("generator_trained", end) - seen["stage_start:round-01/generate"]
    # a kill aimed at round 1's generation comes once the generator is trained (cached): its sampling alone
    durations["round-01/generate"] = max(0.2, durations["round-01/generate"] - durations["generator-training"])
    durations["report"] = end - seen["stage_done:final"]
    return {"run_dir": events.run_dir, "seconds": end, "stages": stages, "durations": durations,
            "lock_check": lock_check}


def phase_complete(phase: str, folder: Path, run_dir: Path | None) -> bool:
    if run_dir is None:
        return False
    if phase == "generator-training":
        return generator_trained(folder) or (run_dir / "round-01/generate").is_dir()
    if phase in ("report", "resume-setup"):
        return False
    return (run_dir / phase).is_dir()


def next_target(folder: Path, run_dir: Path | None, order: list[str], remaining: dict[str, int], missed: Counter,
                n_kills: int) -> str | None:
    """The next phase to kill: a `vsi resume` set-up kill once the run has been killed once (the next
    process is a resume), else the earliest phase in run order with kills left that is not complete yet
    (an overshooting kill can complete a phase early)."""
    if remaining["resume-setup"] and n_kills >= 1:
        return "resume-setup"
    for phase in order:
        if remaining[phase] and phase_complete(phase, folder, run_dir):
            missed[phase] += remaining[phase]  # complete already: those kills cannot happen any more
            remaining[phase] = 0
        if remaining[phase]:
            return phase
    return None


def summary_stamp(run_dir: Path | None) -> int | None:
    try:
        return (run_dir / "summary.json").stat().st_mtime_ns  # type: ignore[operator]
    except (OSError, TypeError):
        return None


def landed_in(rows: list[dict], target: str, folder: Path, run_dir: Path | None, stamp: int | None) -> str:
    """Where a kill landed, from the new events of its process and the generator cache."""
    stage = open_stage(rows)
    if stage == "round-01/generate" and not generator_trained(folder):
        return "generator-training"
    if stage is not None:
        return stage
    if target == "report" and stamp != summary_stamp(run_dir):
        return "report"  # final was complete before this process: no stage event, summary rewritten
    return "resume-setup" if not any(e.get("event") == "stage_start" for e in rows) else "between stages"


def run_scenario(folder: Path, ref: dict, rng: random.Random, max_processes: int = 60) -> dict:
    cfg = write_config(folder)
    runs = folder / "runs"
    run_dir: Path | None = None
    order = phase_order(ref["stages"])
    remaining, missed = plan_for(ref["stages"]), Counter()
    kills, processes = [], 0
    durations = ref["durations"]
    while (target := next_target(folder, run_dir, order, remaining, missed, len(kills))) is not None \
            and processes < max_processes:
        proc = launch("run", str(cfg)) if run_dir is None else launch("resume", str(run_dir))
        processes += 1
        events = Events(runs, run_dir)
        started = time.perf_counter()
        stamp = summary_stamp(run_dir)
        delay = rng.uniform(0, 0.5 * durations[target])
        armed_at = started if target == "resume-setup" else None
        while proc.poll() is None:
            rows = events.poll()
            if armed_at is None:
                if target == "report":  # the report phase starts by (re)writing summary.json
                    hit = summary_stamp(events.run_dir) not in (None, stamp)
                else:
                    stage = "round-01/generate" if target == "generator-training" else target
                    hit = any((e.get("event"), e.get("stage")) == ("stage_start", stage) for e in rows)
                    if target == "round-01/generate":  # its sampling: once the generator is trained
                        hit = hit and generator_trained(folder)
                armed_at = time.perf_counter() if hit else None
            if armed_at is not None and time.perf_counter() - armed_at >= delay:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.002)
        run_dir = events.run_dir
        if proc.returncode != -signal.SIGKILL:  # finished (or failed) before the kill point
            kills.append({"target": target, "landed": None, "exit_code": proc.returncode,
                          "stderr": proc.stderr.read().strip()[-500:]})
            missed[target] += remaining[target]
            break
        landed = landed_in(events.poll(), target, folder, run_dir, stamp)
        # a kill counts for the phase it landed in; one landing where no kill is left counts for its target,
        # so a target that keeps being overshot (or undershot) cannot loop
        spent = landed if remaining.get(landed, 0) > 0 else target
        remaining[spent] = max(0, remaining[spent] - 1)
        kills.append({"target": target, "landed": landed, "delay_s": round(delay, 3),
                      "after_start_s": round(time.perf_counter() - started, 3)})
    final = subprocess.run([sys.executable, "-m", "vision_si.cli", "resume", str(run_dir), "--quiet"], env=ENV,
                           cwd=REPO, capture_output=True, text=True, timeout=1200)
    processes += 1
    return {"run_dir": run_dir, "kills": kills, "processes": processes, "final_exit_code": final.returncode,
            "final_stderr": final.stderr.strip()[-1000:], "missed": dict(missed)}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifests(run: Path) -> dict[str, list[dict]]:
    """Every round's manifest rows, by round folder."""
    return {p.parent.parent.name: [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
            for p in sorted(run.glob("round-*/generate/manifest.jsonl"))}


def comparable(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    return {"test": s["test"], "rounds": s["rounds"], "dataset": s["dataset"],
            "synthetic_in_eval_splits": s["synthetic_in_eval_splits"]}


def verify(run: Path, reference: Path, folder: Path) -> dict:
    """What a killed-and-resumed run lost or changed compared with the reference (all empty: nothing)."""
    out: dict = {"summary_differs": comparable(run) != comparable(reference)}
    mine, ref = manifests(run), manifests(reference)
    out["rounds_differ"] = sorted(set(mine) ^ set(ref))
    keys = ("duplicated_ids", "lost_ids", "extra_ids", "files_without_row", "rows_without_file", "sha256_mismatch",
            "images_differ_from_reference", "generator_differs")
    for key in keys:
        out[key] = []
    out["manifest_rows"] = 0
    for tag, rows in mine.items():
        ref_rows = ref.get(tag, [])
        ids = [r["id"] for r in rows]
        out["manifest_rows"] += len(rows)
        out["duplicated_ids"] += sorted(i for i, n in Counter(ids).items() if n > 1)
        out["lost_ids"] += sorted({r["id"] for r in ref_rows} - set(ids))
        out["extra_ids"] += sorted(set(ids) - {r["id"] for r in ref_rows})
        gen = run / tag / "generate"
        files = {p.name for p in (gen / "images").iterdir()}
        named = {Path(r["path"]).name for r in rows}
        out["files_without_row"] += sorted(files - named)
        out["rows_without_file"] += sorted(named - files)
        out["sha256_mismatch"] += sorted(r["id"] for r in rows
                                         if (gen / r["path"]).is_file() and sha(gen / r["path"]) != r["sha256"])
        ref_sha = {r["id"]: (r["sha256"], r["generator_sha256"]) for r in ref_rows}
        out["images_differ_from_reference"] += sorted(r["id"] for r in rows if ref_sha.get(r["id"], ("",))[0] != r["sha256"])
        out["generator_differs"] += sorted(r["id"] for r in rows if ref_sha.get(r["id"], ("", ""))[1] != r["generator_sha256"])
    out["checkpoints_differ"] = sorted(
        str(p.relative_to(run)) for p in run.glob("round-*/*/*/model.json")
        if not (reference / p.relative_to(run)).is_file()
        or json.loads(p.read_text())["weights_sha256"] != json.loads((reference / p.relative_to(run)).read_text())["weights_sha256"])
    out["leftovers"] = sorted(str(p.relative_to(run)) for p in run.rglob("*")
                              if p.name.endswith(".tmp") or p.name == "lock" or ".tmp" in p.parent.name)
    out["leftovers"] += sorted(str(p) for p in (folder / "cache" / "generators").glob("*.partial"))
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.startswith("{")]
    out["test_evaluations"] = sum(e["event"] == "test_evaluated" for e in events)
    out["ok"] = (not out["summary_differs"] and not any(out[k] for k in (*keys, "rounds_differ", "checkpoints_differ",
                                                                          "leftovers"))
                 and out["test_evaluations"] == 1)
    return out


LOSS_KEYS = ("lost_ids", "duplicated_ids", "files_without_row", "rows_without_file", "sha256_mismatch",
             "images_differ_from_reference", "generator_differs", "checkpoints_differ", "leftovers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "faults")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vsi-faults-"))
    t0 = time.perf_counter()
    rng = random.Random(args.seed)

    ref = reference_run(work / "reference")
    print(f"reference run: {ref['seconds']:.1f}s; phase durations (s): "
          + ", ".join(f"{k} {v:.2f}" for k, v in ref["durations"].items()))
    print(f"second process on the running reference: exit {ref['lock_check']['exit_code']}: "
          f"{ref['lock_check']['stderr']}")
    plan = plan_for(ref["stages"])

    scenarios = []
    for k in range(args.scenarios):
        folder = work / f"scenario-{k}"
        sc = run_scenario(folder, ref, rng)
        sc["verify"] = verify(sc["run_dir"], ref["run_dir"], folder) if sc["final_exit_code"] == 0 else {"ok": False}
        scenarios.append(sc)
        landed = [x["landed"] for x in sc["kills"] if x["landed"]]
        print(f"scenario {k}: {len(landed)} kills ({', '.join(landed)}); final resume exit {sc['final_exit_code']}; "
              f"verified: {sc['verify']['ok']}", flush=True)
        if not sc["verify"]["ok"]:
            print(json.dumps(sc["verify"], indent=1), sc["final_stderr"])

    kills = [x for sc in scenarios for x in sc["kills"] if x["landed"]]
    survived = [x for sc in scenarios if sc["verify"]["ok"] for x in sc["kills"] if x["landed"]]
    per_phase = Counter(x["landed"] for x in kills)
    lost = {key: sorted({i for sc in scenarios for i in sc["verify"].get(key, [])}) for key in LOSS_KEYS}
    result = {
        "config": TINY, "scenarios": args.scenarios, "kill_seed": args.seed, "plan_per_scenario": plan,
        "reference": {"seconds": round(ref["seconds"], 2), "stages": ref["stages"],
                      "durations_s": {k: round(v, 3) for k, v in ref["durations"].items()},
                      "second_process_on_lock": ref["lock_check"]},
        "kills": len(kills), "kills_survived": len(survived), "kills_per_phase": dict(per_phase),
        "processes": sum(sc["processes"] for sc in scenarios),
        "summary_equal_to_reference": all(not sc["verify"].get("summary_differs", True) for sc in scenarios),
        "lost": lost,
        "scenario_details": [{k: (str(v) if isinstance(v, Path) else v) for k, v in sc.items()} for sc in scenarios],
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "omp_threads": 1},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lock = ref["lock_check"]
    md = [
        "# Fault injection: SIGKILL at random points of every stage",
        "",
        f"`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/faults.py --scenarios {args.scenarios} --seed {args.seed}` "
        f"({result['seconds'] / 60:.1f} min on {os.cpu_count()} CPUs)",
        "",
        f"- kills: **{len(kills)}**, survived: **{len(survived)}** "
        f"({result['processes']} processes over {args.scenarios} killed runs of the tiny digits config, "
        f"stages {', '.join(ref['stages'])})",
        "- kills per phase where they landed: " + ", ".join(f"{k} {v}" for k, v in sorted(per_phase.items())),
        f"- final summary.json equal to the uninterrupted run's: {result['summary_equal_to_reference']}",
        "- lost or changed: " + ("nothing" if not any(lost.values())
                                 else "; ".join(f"{k}: {v}" for k, v in lost.items() if v)),
        "  (checked: manifest rows vs image files one to one in every round, every sha256, PNG bytes, generator",
        "  and checkpoint sha256 equal to the reference's, no `.tmp` folder/file, lock or partial generator",
        "  training left, `test` evaluated once)",
        f"- a second `vsi resume` started while the reference run held its directory: exit {lock['exit_code']}: "
        f"`{lock['stderr']}`; the reference then completed and is the baseline every killed run matched",
        "- planned kills that could not happen (their phase completed under an overshooting kill): "
        + (", ".join(f"scenario {k}: {sc['missed']}" for k, sc in enumerate(scenarios) if sc["missed"]) or "none"),
        "",
        "| scenario | target | landed in | delay after target start (s) |",
        "|---|---|---|---|",
    ]
    for k, sc in enumerate(scenarios):
        for x in sc["kills"]:
            md.append(f"| {k} | {x['target']} | {x['landed'] or 'finished before the kill'} | {x.get('delay_s', '')} |")
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"kills: {len(kills)}, survived: {len(survived)}; per phase: {dict(sorted(per_phase.items()))}")
    print("lost or changed:", "nothing" if not any(lost.values()) else lost)
    print(f"written {args.out.with_suffix('.json')} and .md in {result['seconds']:.0f}s")


if __name__ == "__main__":
    main()
