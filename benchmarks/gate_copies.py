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
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gate_copies.py --dataset elpv --control 4  # noise control

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
    n_max = max(res["rows"][0]["n_train"], 1)
    cap = "the whole train split" if res["train_per_class"] >= n_max else f"at most {res['train_per_class']} a class"
    lines = [f"# Gate vs a pool of exact copies ({res['dataset']})", "",
             f"{res['repeats']} repeats; per repeat {res['rows'][0]['n_train']} training images "
             f"({cap}), each copied once as a candidate; "
             f"{res['rows'][0]['n_val']} val images. Classifier `{res['classifier']['arch']}` "
             f"{res['classifier']['model_kwargs']}, {res['classifier']['steps']} steps, batch "
             f"{res['classifier']['batch_size']}, augment `{res['augment']}`. Gate: {res['gate']}.", "",
             "| gate.seeds | trials | accepted | acceptance rate [95% Wilson] | lower bound > 0 but a class "
             "regressed | mean Δ (sd) | max lower bound | median CI width |", "|---|---|---|---|---|---|---|---|"]
    for key in ("seeds1", "seeds3"):
        s = res["summary"][key]
        lines.append(f"| {key[-1]} | {s['trials']} | {s['accepted']} | {s['acceptance_rate']:.3f} "
                     f"[{s['acceptance_rate_ci95'][0]:.3f}, {s['acceptance_rate_ci95'][1]:.3f}] | "
                     f"{s['class_regression_rejections']} | "
                     f"{s['delta_mean']:+.4f} ({s['delta_sd'] or 0:.4f}) | {s['lower_bound_max']:+.4f} | "
                     f"{s['ci_width_median']:.4f} |")
    lines += ["", f"Baseline val macro-F1 (mean over models): {res['baseline_macro_f1_mean']:.4f}. "
              f"Wall time {res['seconds']:.0f} s on {res['machine']}.",
              "", "`gate.seeds = 1` trials are the single-seed decisions of the same models (3 per repeat, "
              "sharing the repeat's data), so they are not fully independent."]
    return "\n".join(lines) + "\n"


def order_control(profile: dict, data: dict, repeats: int, train_per_class: int, work: Path) -> dict:
    """Training noise alone: the same data in permuted row order vs train + copies, one seed per split.

    Both differ from the baseline only in the order of the draws, so their deltas show how far a
    retrained model moves by chance (seed 1000·r + 7, other seeds than the main run's).
    """
    table, data_cfg, clf_cfg = data["table"], profile["data"], profile["clf"]
    rows = []
    for r in range(repeats):
        seed = 1000 * r + 7
        splits = make_splits(table, data_cfg.split, 1000 * r)
        train_rows = np.flatnonzero(splits == "train")
        rng = np.random.default_rng(1000 * r)
        keep = np.concatenate([rng.permutation(train_rows[table.labels[train_rows] == c])[:train_per_class]
                               for c in range(len(table.classes))])
        val_rows = np.flatnonzero(splits == "val")
        tx, ty, vx, vy = data["x"][keep], table.labels[keep], data["x"][val_rows], table.labels[val_rows]
        perm = np.random.default_rng(seed).permutation(len(ty))
        f1 = {}
        for name, (x, y), extra in (("baseline", (tx, ty), {}), ("permuted", (tx[perm], ty[perm]), {}),
                                    ("copies", (tx, ty), {"extra_images": tx.copy(), "extra_labels": ty.copy()})):
            clf = train_classifier(clf_cfg, x, y, classes=list(table.classes), seed=seed,
                                   out_dir=work / f"control-{r}-{name}", progress=False,
                                   augment=build_augmentation(data_cfg.augment, tx.shape[1], seed), **extra)
            f1[name] = classification_metrics(vy, predict(clf, vx).probs.argmax(1), list(table.classes))["macro_f1"]
        rows.append({"split_seed": 1000 * r, "seed": seed, **f1, "permuted_minus_baseline": f1["permuted"] - f1["baseline"],
                     "copies_minus_baseline": f1["copies"] - f1["baseline"]})
        print(f"control {r}: permuted − baseline {rows[-1]['permuted_minus_baseline']:+.4f}, "
              f"copies − baseline {rows[-1]['copies_minus_baseline']:+.4f}", flush=True)
    return {"dataset": profile["data"].source, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=sorted(PROFILES), default="digits")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--train-per-class", type=int, default=20)
    ap.add_argument("--control", type=int, default=0, metavar="N",
                    help="instead: N splits of the order control (permuted data and copies vs baseline, one seed)")
    args = ap.parse_args()
    profile = PROFILES[args.dataset]
    start = time.time()
    table = load_source(profile["data"], 0, progress=False)
    x = load_images(table, np.arange(len(table)), profile["data"])
    data = {"table": table, "x": x}
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.control:
        with tempfile.TemporaryDirectory(prefix="gate_copies_control_") as tmp:
            res = order_control(profile, data, args.control, args.train_per_class, Path(tmp))
        res["seconds"] = time.time() - start
        path = RESULTS / f"gate_copies_{args.dataset}_control.json"
        path.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        print(f"written: {path}")
        return
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
    out = RESULTS / f"gate_copies_{args.dataset}"
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(res), encoding="utf-8")
    print(markdown(res))
    print(f"written: {out}.json, {out}.md")


if __name__ == "__main__":
    main()
