"""The gate's power and false-acceptance rate, measured with controls whose right answer is known.

Setting (fixed before any number was seen): ELPV through the run's own data and split code
(`--config`, the ELPV CPU profile by default). The classifier trains on a stratified quarter of the
train split (`--fraction`), the rest of train is held back: in this regime extra real data helps.
Each trial t draws its own quarter and round-0 seed, trains the round-0 model once, then offers the
gate (`run_gate`, the run config's `gate:` section and rule, warm-started from the round-0 model)
four pools for the two scarcest classes (possibly_defective, likely_defective):

- `helpful_real`: every held-back real image of those classes, correctly labelled (must be accepted);
- `exact_copies`: as many exact copies of the quarter's own images of those classes (must be refused);
- `flipped_labels`: the same held-back images, each given another class drawn at random (refused);
- `noise_images`: uniform noise images labelled as those classes, as many (refused).

The gate judges on the `val` half the loop gives it (`judge_split`); `test` never decides anything.
For every pool the paired models the gate trained (baseline-k, candidate-k) are then evaluated on
`test`, calibrated on the selection half exactly as the gate does, so the table reports the pool's
true effect on test next to the gate's decision.

`--compare-start N` also measures, on the first N trials, the paired variance of warm-started
versus from-scratch sides (the helpful pool and the copies, `--compare-seeds` seeds each, no early
stopping): the default `gate.start` is the one with the smaller between-seed spread.

    .venv/bin/python benchmarks/gate_power.py --trials 20
    .venv/bin/python benchmarks/gate_power.py --trials 2 --quick        # a smoke run (minutes)

Resumable: models and decisions live under benchmarks/results/work/gate_power/ (a finished model is
loaded, a finished decision reused). Writes benchmarks/results/gate_power.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from classifier_recipe import commit  # noqa: E402 - a sibling script: benchmarks/ is on sys.path when run

from vision_si.classifier import load_classifier, predict, train_classifier
from vision_si.classifier.training import train_steps
from vision_si.config import RunConfig, load_config
from vision_si.data import build_augmentation, judge_split, load_images, load_source, make_splits
from vision_si.data.arrays import LabelledImages
from vision_si.gate import GateDecision, fit_calibration, paired_interval, run_gate
from vision_si.metrics import wilson_interval

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONTROLS = ("helpful_real", "exact_copies", "flipped_labels", "noise_images")
MUST_ACCEPT = {"helpful_real"}
WEAK = ("possibly_defective", "likely_defective")




def load_data(cfg: RunConfig) -> dict:
    table = load_source(cfg.data, cfg.seed, progress=False)
    split_seed = cfg.seed if cfg.data.split.seed is None else cfg.data.split.seed
    splits = make_splits(table, cfg.data.split, split_seed)
    out = {"classes": list(table.classes)}
    for name in ("train", "val", "test"):
        idx = np.flatnonzero(splits == name)
        out[name] = LabelledImages(load_images(table, idx, cfg.data, progress=False), table.labels[idx],
                                   [table.ids[i] for i in idx], [table.sha256[i] for i in idx])
    select, judge = judge_split(out["val"].labels, cfg.gate.judge_fraction, cfg.seed)
    out["select"], out["judge"] = out["val"].subset(select), out["val"].subset(judge)
    return out


def stratified_fraction(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    keep = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        keep.append(rows[:max(2, int(round(fraction * len(rows))))])
    return np.sort(np.concatenate(keep))


def pools(data: dict, quarter: np.ndarray, held: np.ndarray, rng: np.random.Generator) -> dict[str, LabelledImages]:
    train, classes = data["train"], data["classes"]
    weak = [classes.index(c) for c in WEAK]
    held_weak = held[np.isin(train.labels[held], weak)]
    real = train.subset(held_weak)
    n = len(real)
    own_weak = quarter[np.isin(train.labels[quarter], weak)]
    copies = train.subset(rng.choice(own_weak, n, replace=True))
    copies = dataclasses.replace(copies, ids=[f"copy-{i}-{v}" for i, v in enumerate(copies.ids)])
    wrong = (real.labels + rng.integers(1, len(classes), n)) % len(classes)
    flipped = dataclasses.replace(real, labels=wrong.astype(np.int64), ids=[f"flip-{v}" for v in real.ids])
    noise = LabelledImages(rng.uniform(0, 1, real.images.shape).astype(np.float32), real.labels.copy(),
                           [f"noise-{i}" for i in range(n)], [f"noise-{i}" for i in range(n)])
    return {"helpful_real": real, "exact_copies": copies, "flipped_labels": flipped, "noise_images": noise}


def log_probs(model, images: np.ndarray) -> np.ndarray:
    logits = predict(model, images, batch_size=256).logits.astype(np.float64)
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


def test_effect(cfg: RunConfig, data: dict, gate_dir: Path, n_models: int) -> dict:
    """The pool's effect on `test`: paired models of the gate, calibrated on the selection images as the gate does."""
    sel, test = data["select"], data["test"]
    sides = {}
    for side in ("baseline", "candidate"):
        cal = []
        for k in range(n_models):
            m = load_classifier(gate_dir / f"{side}-{k}", "cpu")
            c = fit_calibration(log_probs(m, sel.images), sel.labels)
            cal.append(c.apply(log_probs(m, test.images)))
        sides[side] = np.stack(cal)
    prior = np.bincount(sel.labels, minlength=len(data["classes"])) / len(sel)
    out = {}
    for metric in ("macro_auroc", "macro_f1"):
        iv = paired_interval(metric, test.labels, sides["baseline"], sides["candidate"], prior,
                             one_sided_alpha=0.025, n_bootstrap=500, seed=0)
        out[metric] = {"delta": iv.delta, "ci": [iv.lower, iv.upper], "per_seed": iv.per_seed, "method": iv.method}
    return out


def augment_factory(cfg: RunConfig, channels: int):
    def build(seed: int):
        return build_augmentation(cfg.data.augment, channels, seed)

    return build


def run_trial(cfg: RunConfig, data: dict, t: int, work: Path, controls: list[str], progress: bool) -> dict:
    rng = np.random.default_rng(np.random.SeedSequence([2026, t]))
    train = data["train"]
    quarter = stratified_fraction(train.labels, args.fraction, rng)
    held = np.setdiff1d(np.arange(len(train)), quarter)
    part = train.subset(quarter)
    seed = 1000 * (t + 1)
    augment = augment_factory(cfg, part.images.shape[1])
    start = time.time()
    trial_dir = work / f"trial-{t:02d}"
    round0 = train_classifier(cfg.classifier, part.images, part.labels, classes=data["classes"], seed=seed,
                              out_dir=trial_dir / "round0", augment=augment(seed), progress=progress)
    round0_seconds = time.time() - start
    record = {"trial": t, "seed": seed, "n_train": len(part), "round0_seconds": round0_seconds,
              "round0_steps": train_steps(cfg.classifier, len(part)), "controls": {}}
    offered = pools(data, quarter, held, rng)
    for name in controls:
        gate_dir = trial_dir / name
        t0 = time.time()
        done = (gate_dir / "decision.json").is_file()
        d = GateDecision.load(gate_dir) if done else run_gate(
            cfg.gate, cfg.classifier, train=part, pool=None, candidates=offered[name], select=data["select"],
            judge=data["judge"], classes=data["classes"], seed=seed, out_dir=gate_dir, current=round0,
            augment=augment, progress=progress)
        n_models = len(d.seeds)
        record["controls"][name] = {
            "accepted": d.accepted, "reason_code": d.reason_code, "delta": d.delta.value, "ci": d.delta.ci,
            "seeds": n_models, "superiority": d.superiority, "non_inferiority": d.non_inferiority,
            "seconds": d.training.get("seconds", time.time() - t0), "n_pool": len(offered[name]),
            "test": test_effect(cfg, data, gate_dir, n_models)}
        print(f"trial {t:2d} {name:15s} {'ACCEPT' if d.accepted else 'refuse'} {d.metric} {d.delta.value:+.4f} "
              f"[{d.delta.ci[0]:+.4f}, {d.delta.ci[1]:+.4f}] seeds {n_models} "
              f"({record['controls'][name]['seconds']:.0f}s; round-0 {round0_seconds:.0f}s) "
              f"test Δauroc {record['controls'][name]['test']['macro_auroc']['delta']:+.4f}", flush=True)
    return record


def compare_start(cfg: RunConfig, data: dict, t: int, work: Path, progress: bool) -> dict:
    """Between-seed spread of the paired improvement, warm-started sides against from-scratch sides."""
    rng = np.random.default_rng(np.random.SeedSequence([2026, t]))
    train = data["train"]
    quarter = stratified_fraction(train.labels, args.fraction, rng)
    held = np.setdiff1d(np.arange(len(train)), quarter)
    part = train.subset(quarter)
    seed = 1000 * (t + 1)
    augment = augment_factory(cfg, part.images.shape[1])
    round0 = load_classifier(work / f"trial-{t:02d}" / "round0", "cpu")
    offered = pools(data, quarter, held, rng)
    out = {}
    for start in ("warm", "scratch"):
        g = dataclasses.replace(cfg.gate, start=start, seeds_per_look=args.compare_seeds,
                                max_seeds=args.compare_seeds)
        for name in ("helpful_real", "exact_copies"):
            d = run_gate(g, cfg.classifier, train=part, pool=None, candidates=offered[name], select=data["select"],
                         judge=data["judge"], classes=data["classes"], seed=seed,
                         out_dir=work / f"trial-{t:02d}" / f"compare-{start}" / name, current=round0,
                         augment=augment, progress=progress)
            out[f"{start}/{name}"] = {"per_seed": d.per_seed, "seed_sd": d.seed_sd, "delta": d.delta.value,
                                      "seconds": d.training.get("seconds")}
            print(f"compare trial {t} {start:7s} {name:13s} per-seed sd {d.seed_sd:.4f} delta {d.delta.value:+.4f}",
                  flush=True)
    return out


def summarise(cfg: RunConfig, trials: list[dict], comparisons: list[dict]) -> dict:
    controls = {}
    for name in CONTROLS:
        rows = [r["controls"][name] for r in trials if name in r["controls"]]
        if not rows:
            continue
        k = sum(r["accepted"] for r in rows)
        lo, hi = wilson_interval(k, len(rows))
        gains = np.array([r["test"]["macro_auroc"]["delta"] for r in rows])
        f1 = np.array([r["test"]["macro_f1"]["delta"] for r in rows])
        controls[name] = {
            "trials": len(rows), "accepted": int(k), "rate": k / len(rows), "rate_ci95_wilson": [lo, hi],
            "target": "accepted in >= 80 %" if name in MUST_ACCEPT else "accepted in <= 5 %",
            "true_test_gain": {"macro_auroc_mean": float(gains.mean()), "macro_auroc_sd_over_trials": float(gains.std(ddof=1)) if len(gains) > 1 else None,
                               "macro_f1_mean": float(f1.mean())},
            "seeds_median": float(np.median([r["seeds"] for r in rows])),
            "decision_seconds_median": float(np.median([r["seconds"] for r in rows]))}
    decisions = [r["seconds"] for t in trials for r in t["controls"].values()]
    round0 = [t["round0_seconds"] for t in trials]
    out = {"commit": commit(), "config": args.config, "fraction": args.fraction, "weak_classes": list(WEAK),
           "controls": controls,
           "decision_seconds_median": float(np.median(decisions)) if decisions else None,
           "round0_train_seconds_median": float(np.median(round0)) if round0 else None,
           "decision_over_round0": (float(np.median(decisions) / np.median(round0)) if decisions else None),
           "rule": (f"admit by {cfg.gate.admit} on {cfg.gate.metric} (min_delta {cfg.gate.min_delta}, margin "
                    f"{cfg.gate.margin}); looks at {cfg.gate.look_schedule()} paired seeds, O'Brien-Fleming "
                    f"spending of one-sided {(1 - cfg.gate.confidence) / 2:g}, futility at confidence "
                    f"{cfg.gate.confidence}; checks macro-F1 margin {cfg.gate.f1_margin}, recall tolerance "
                    f"{cfg.gate.tolerance} or {cfg.gate.tolerance_min_images} image(s); start {cfg.gate.start}, "
                    f"{cfg.gate.finetune_epochs} fine-tuning epochs; judged on {len(DATA['judge'])} val images"),
           "trials": trials, "machine": {"cpu_threads": torch.get_num_threads(), "python": platform.python_version()}}
    if comparisons:
        spread = {}
        for key in comparisons[0]:
            sds = [c[key]["seed_sd"] for c in comparisons if c[key]["seed_sd"] is not None]
            spread[key] = {"seed_sd_median": float(np.median(sds)), "seed_sd": sds,
                           "delta": [c[key]["delta"] for c in comparisons]}
        out["start_comparison"] = {"trials": len(comparisons), "seeds": args.compare_seeds, "spread": spread}
    return out


def markdown(res: dict) -> str:
    lines = ["# Gate power on ELPV (benchmarks/gate_power.py)", "",
             f"Commit `{res['commit'][:10]}`; config `{res['config']}`; the classifier trains on "
             f"{res['fraction']:.0%} of train; rule: {res['rule']}.", "",
             "| control | trials | accepted | rate [95% Wilson] | target | test Δ macro AUROC (mean) | test Δ macro-F1 | median seeds | median s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, c in res["controls"].items():
        lo, hi = c["rate_ci95_wilson"]
        g = c["true_test_gain"]
        lines.append(f"| {name} | {c['trials']} | {c['accepted']} | {c['rate']:.2f} [{lo:.2f}, {hi:.2f}] | "
                     f"{c['target']} | {g['macro_auroc_mean']:+.4f} | {g['macro_f1_mean']:+.4f} | "
                     f"{c['seeds_median']:.0f} | {c['decision_seconds_median']:.0f} |")
    lines += ["", f"Median decision {res['decision_seconds_median']:.0f} s against a median round-0 training of "
              f"{res['round0_train_seconds_median']:.0f} s: {res['decision_over_round0']:.2f}x (target <= 3x).", ""]
    if "start_comparison" in res:
        sc = res["start_comparison"]
        lines += [f"Warm against scratch ({sc['trials']} trials, {sc['seeds']} paired seeds each): median "
                  "between-seed sd of the paired improvement", ""]
        lines += [f"- {k}: {v['seed_sd_median']:.4f}" for k, v in sc["spread"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/elpv-cpu.yaml")
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. gate.max_seeds=6")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--first-trial", type=int, default=0)
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--controls", nargs="+", default=list(CONTROLS), choices=CONTROLS)
    ap.add_argument("--compare-start", type=int, default=0, help="trials on which warm and scratch are compared")
    ap.add_argument("--compare-seeds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="a smoke run: small budgets, results not written")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default=None, help="results name (default gate_power)")
    args = ap.parse_args()
    overrides = list(args.set)
    if args.quick:
        overrides += ["classifier.epochs=1", "gate.finetune_epochs=0.5", "gate.seeds_per_look=2", "gate.max_seeds=2",
                      "data.image_size=32"]
    cfg = load_config(args.config, overrides)
    name = args.out or ("gate_power_quick" if args.quick else "gate_power")
    work = RESULTS / "work" / name
    DATA = load_data(cfg)
    trials, comparisons = [], []
    for t in range(args.first_trial, args.first_trial + args.trials):
        trials.append(run_trial(cfg, DATA, t, work, args.controls, args.progress))
        if t - args.first_trial < args.compare_start:
            comparisons.append(compare_start(cfg, DATA, t, work, args.progress))
        res = summarise(cfg, trials, comparisons)
        (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=1))
        (RESULTS / f"{name}.md").write_text(markdown(res))
    print(markdown(res))
