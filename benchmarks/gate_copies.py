"""How often does the gate call a pool of exact copies of real training images a gain?

Copies add no information: a model trained on train + copies sees the same images, only drawn in
another order with other augmentation seeds, so any difference from the baseline is training
noise. The gate's paired bootstrap resamples val images and does not see that noise; training
both sides from the same seeds, and several seeds a side, is meant to keep it from being fooled.

For each repeat r (run seed s = 1000·r): the data is split by the data layer (seed s), the training
split is cut to `--train-per-class` images a class (seed s, the scarce-data regime), the baseline is
trained with seeds s, s+1, s+2, and `run_gate` with `gate.seeds = 3` trains the candidates on the
same recipe with every training image copied once as a candidate (seeds s, s+1, s+2, the same as
the baseline side). The gate with `gate.seeds = 1` at run seed s+k trains exactly model k of each
side, so its decisions come from the same models at no extra cost (3 per repeat, sharing the copies).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gate_copies.py [--dataset digits|elpv] [--repeats 10]

Writes benchmarks/results/gate_copies_<dataset>.json and .md and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vision_si.classifier import load_classifier, predict, train_classifier
from vision_si.config import ClassifierConfig, DataConfig, GateConfig
from vision_si.data import build_augmentation, load_images, load_source, make_splits
from vision_si.gate import decide, run_gate
from vision_si.metrics import classification_metrics, wilson_interval

RESULTS = Path(__file__).resolve().parent / "results"

PROFILES = {
    # small timm ResNet, few steps: the quick profile's regime, where training noise is largest
    "digits": dict(data=DataConfig(source="digits", image_size=8, channels=1, augment="light"),
                   clf=ClassifierConfig(arch="resnet10t", model_kwargs={"channels": [16, 32, 64, 128]}, steps=100,
                                        batch_size=32, lr=3e-3, warmup_steps=10, device="cpu", eval_every=10_000)),
    "elpv": dict(data=DataConfig(source="elpv", image_size=32, channels=1, augment="standard"),
                 clf=ClassifierConfig(arch="resnet10t", model_kwargs={"channels": [16, 32, 64, 128]}, steps=150,
                                      batch_size=32, lr=3e-3, warmup_steps=15, device="cpu", eval_every=10_000)),
}


def one_repeat(r: int, data, profile: dict, train_per_class: int, work: Path) -> dict:
    table, data_cfg, clf_cfg = data["table"], profile["data"], profile["clf"]
    seed = 1000 * r
    splits = make_splits(table, data_cfg.split, seed)
    rng = np.random.default_rng(seed)
    train_rows = np.flatnonzero(splits == "train")
    keep = np.concatenate([rng.permutation(train_rows[table.labels[train_rows] == c])[:train_per_class]
                           for c in range(len(table.classes))])
    val_rows = np.flatnonzero(splits == "val")
    tx, ty = data["x"][keep], table.labels[keep]
    vx, vy = data["x"][val_rows], table.labels[val_rows]
    classes = list(table.classes)
    seeds = [seed + k for k in range(3)]

    def aug(s: int):
        return build_augmentation(data_cfg.augment, tx.shape[1], s)

    base = []
    for k, s in enumerate(seeds):
        clf = train_classifier(clf_cfg, tx, ty, classes=classes, seed=s, out_dir=work / f"r{r}" / f"baseline-{k}",
                               augment=aug(s), progress=False)
        base.append(predict(clf, vx).probs.argmax(1))
    base = np.stack(base)
    gate_dir = work / f"r{r}" / "gate"
    copy_ids = [f"copy-of-{table.ids[i]}" for i in keep]
    d3 = run_gate(GateConfig(seeds=3), clf_cfg, train_images=tx, train_labels=ty, pool_images=None, pool_labels=None,
                  pool_ids=None, candidate_images=tx.copy(), candidate_labels=ty.copy(), candidate_ids=copy_ids,
                  val_images=vx, val_labels=vy, classes=classes, seed=seed, out_dir=gate_dir, baseline_preds=base,
                  augment=aug, progress=False)
    cand = np.stack([predict(load_classifier(gate_dir / f"candidate-{k}"), vx).probs.argmax(1) for k in range(3)])
    singles = [decide(GateConfig(seeds=1), val_labels=vy, baseline_preds=base[k], candidate_preds=cand[k],
                      classes=classes, seed=s, model_seeds=[s]) for k, s in enumerate(seeds)]
    row = {"repeat": r, "seed": seed, "n_train": int(len(ty)), "n_copies": len(copy_ids), "n_val": int(len(vy)),
           "baseline_macro_f1": [classification_metrics(vy, b, classes)["macro_f1"] for b in base],
           "seeds3": {"accepted": d3.accepted, "delta": d3.delta, "reason_code": d3.reason_code},
           "seeds1": [{"seed": d.seeds[0], "accepted": d.accepted, "delta": d.delta, "reason_code": d.reason_code}
                      for d in singles]}
    return row


def summarise(decisions: list[dict]) -> dict:
    n = len(decisions)
    acc = sum(d["accepted"] for d in decisions)
    deltas = np.array([d["delta"]["value"] for d in decisions])
    lowers = np.array([d["delta"]["ci"][0] for d in decisions])
    widths = np.array([d["delta"]["ci"][1] - d["delta"]["ci"][0] for d in decisions])
    lo, hi = wilson_interval(acc, n)
    return {"trials": n, "accepted": int(acc), "acceptance_rate": acc / n if n else None,
            "acceptance_rate_ci95": [lo, hi], "class_regression_rejections":
                sum(d["reason_code"] == "class_regression" for d in decisions),
            "delta_mean": float(deltas.mean()), "delta_sd": float(deltas.std(ddof=1)) if n > 1 else None,
            "delta_min": float(deltas.min()), "delta_max": float(deltas.max()),
            "lower_bound_max": float(lowers.max()), "ci_width_median": float(np.median(widths)),
            "share_delta_positive": float((deltas > 0).mean())}


def markdown(res: dict) -> str:
    lines = [f"# Gate vs a pool of exact copies ({res['dataset']})", "",
             f"{res['repeats']} repeats; per repeat {res['rows'][0]['n_train']} training images "
             f"(at most {res['train_per_class']} a class), each copied once as a candidate; "
             f"{res['rows'][0]['n_val']} val images. Classifier `{res['classifier']['arch']}` "
             f"{res['classifier']['model_kwargs']}, {res['classifier']['steps']} steps, batch "
             f"{res['classifier']['batch_size']}, augment `{res['augment']}`. Gate: {res['gate']}.", "",
             "| gate.seeds | trials | accepted | acceptance rate [95% Wilson] | mean Δ (sd) | max lower bound | "
             "median CI width |", "|---|---|---|---|---|---|---|"]
    for key in ("seeds1", "seeds3"):
        s = res["summary"][key]
        lines.append(f"| {key[-1]} | {s['trials']} | {s['accepted']} | {s['acceptance_rate']:.3f} "
                     f"[{s['acceptance_rate_ci95'][0]:.3f}, {s['acceptance_rate_ci95'][1]:.3f}] | "
                     f"{s['delta_mean']:+.4f} ({s['delta_sd'] or 0:.4f}) | {s['lower_bound_max']:+.4f} | "
                     f"{s['ci_width_median']:.4f} |")
    lines += ["", f"Baseline val macro-F1 (mean over models): {res['baseline_macro_f1_mean']:.4f}. "
              f"Wall time {res['seconds']:.0f} s on {res['machine']}.",
              "", "`gate.seeds = 1` trials are the single-seed decisions of the same models (3 per repeat, "
              "sharing the repeat's data), so they are not fully independent."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=sorted(PROFILES), default="digits")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--train-per-class", type=int, default=20)
    args = ap.parse_args()
    profile = PROFILES[args.dataset]
    start = time.time()
    table = load_source(profile["data"], 0, progress=False)
    x = load_images(table, np.arange(len(table)), profile["data"])
    data = {"table": table, "x": x}
    rows = []
    with tempfile.TemporaryDirectory(prefix="gate_copies_") as tmp:
        for r in range(args.repeats):
            t = time.time()
            row = one_repeat(r, data, profile, args.train_per_class, Path(tmp))
            rows.append(row)
            print(f"repeat {r}: seeds=3 {'ACCEPT' if row['seeds3']['accepted'] else 'reject'} "
                  f"Δ {row['seeds3']['delta']['value']:+.4f} lower {row['seeds3']['delta']['ci'][0]:+.4f}; "
                  f"seeds=1 accepted {sum(d['accepted'] for d in row['seeds1'])}/3 ({time.time() - t:.0f} s)",
                  flush=True)
    clf = profile["clf"]
    res = {"dataset": args.dataset, "repeats": args.repeats, "train_per_class": args.train_per_class,
           "augment": profile["data"].augment, "image_size": profile["data"].image_size,
           "classifier": {"arch": clf.arch, "model_kwargs": clf.model_kwargs, "steps": clf.steps,
                          "batch_size": clf.batch_size, "lr": clf.lr, "synthetic_share": clf.synthetic_share},
           "gate": {"metric": "macro_f1", "min_delta": 0.0, "tolerance": 0.05, "n_bootstrap": 1000,
                    "confidence": 0.95},
           "summary": {"seeds1": summarise([d for row in rows for d in row["seeds1"]]),
                       "seeds3": summarise([row["seeds3"] for row in rows])},
           "baseline_macro_f1_mean": float(np.mean([v for row in rows for v in row["baseline_macro_f1"]])),
           "seconds": time.time() - start, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
           "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"gate_copies_{args.dataset}"
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(res), encoding="utf-8")
    print(markdown(res))
    print(f"written: {out}.json, {out}.md")


if __name__ == "__main__":
    main()
