"""How often does the gate call a pool of exact copies of real training images a gain, and how often
does it accept a pool that genuinely helps?

Copies add no information: a model trained on train + copies sees the same images, only drawn in
another order with other augmentation seeds, so any difference from the baseline is training
noise. The gate's paired bootstrap over val images does not see that noise; training both sides
from the same seeds, several seeds a side, and (new) resampling the seed pairs as well as the
images are meant to keep it from being fooled. A gate that rejects everything would pass that
test, so every repeat also offers a helpful pool: extra real training-split images with their
correct labels, held out from the baseline's training set.

For each repeat r (run seed s = 1000·r): the data is split by the data layer (seed s); per class
the training split is cut to `--train-per-class` images (seed s, the scarce-data regime) and the
next `--pool-per-class` images (at most half the class) form the helpful pool. The baseline is
trained with seeds s, s+1, s+2; `run_gate` with `gate.seeds = 3` trains the candidates on the same
recipe and seeds, once with every training image copied once as a candidate, once with the
helpful pool. Every decision rule below is then applied to the same models side by side (the
decision is cheap; the models are the cost): with one seed, model k of each side (3 trials a
repeat); with 2 seeds, models 0 and 1; with 3 seeds, all.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gate_copies.py [--dataset digits|elpv] [--repeats 10]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gate_copies.py --dataset elpv --control 4  # noise control

Writes benchmarks/results/gate_copies_<dataset>.json and .md and prints the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
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


# name → (models used (indices into the 3 seeds; a list of lists gives several trials), GateConfig)
G = GateConfig()
RULES = {
    "1 seed, min_delta 0 (old default)": ([[0], [1], [2]], dataclasses.replace(G, seeds=1)),
    "1 seed, min_delta 0.01": ([[0], [1], [2]], dataclasses.replace(G, seeds=1, min_delta=0.01)),
    "1 seed, min_delta 0.02": ([[0], [1], [2]], dataclasses.replace(G, seeds=1, min_delta=0.02)),
    "2 seeds, images (old)": ([[0, 1]], dataclasses.replace(G, seeds=2, bootstrap="images")),
    "2 seeds, seeds_and_images": ([[0, 1]], dataclasses.replace(G, seeds=2, bootstrap="seeds_and_images")),
    "2 seeds, seeds_and_images, floor auto": ([[0, 1]], dataclasses.replace(G, seeds=2, noise_floor="auto")),
    "3 seeds, images (old)": ([[0, 1, 2]], dataclasses.replace(G, seeds=3, bootstrap="images")),
    "3 seeds, seeds_and_images": ([[0, 1, 2]], dataclasses.replace(G, seeds=3, bootstrap="seeds_and_images")),
    "3 seeds, seeds_and_images, floor auto": ([[0, 1, 2]], dataclasses.replace(G, seeds=3, noise_floor="auto")),
}
POOLS = ("copies", "helpful")


def _split(table, data_cfg, seed: int, train_per_class: int, pool_per_class: int):
    splits = make_splits(table, data_cfg.split, seed)
    rng = np.random.default_rng(seed)
    train_rows = np.flatnonzero(splits == "train")
    keep, pool = [], []
    for c in range(len(table.classes)):
        rows = rng.permutation(train_rows[table.labels[train_rows] == c])
        n_pool = min(pool_per_class, len(rows) // 2)
        n_train = min(train_per_class, len(rows) - n_pool)
        keep.append(rows[:n_train])
        pool.append(rows[n_train:n_train + n_pool])
    return np.concatenate(keep), np.concatenate(pool), np.flatnonzero(splits == "val")


def one_repeat(r: int, data, profile: dict, train_per_class: int, pool_per_class: int, work: Path) -> dict:
    table, data_cfg, clf_cfg = data["table"], profile["data"], profile["clf"]
    seed = 1000 * r
    keep, pool, val_rows = _split(table, data_cfg, seed, train_per_class, pool_per_class)
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
    offered = {"copies": (tx.copy(), ty.copy(), [f"copy-of-{table.ids[i]}" for i in keep]),
               "helpful": (data["x"][pool], table.labels[pool], [f"held-{table.ids[i]}" for i in pool])}
    row = {"repeat": r, "seed": seed, "n_train": int(len(ty)), "n_copies": len(keep), "n_helpful": int(len(pool)),
           "n_val": int(len(vy)),
           "baseline_macro_f1": [classification_metrics(vy, b, classes)["macro_f1"] for b in base]}
    for name, (cx, cy, cids) in offered.items():
        gate_dir = work / f"r{r}" / name
        run_gate(GateConfig(seeds=3), clf_cfg, train_images=tx, train_labels=ty, pool_images=None,
                 pool_labels=None, pool_ids=None, candidate_images=cx, candidate_labels=cy, candidate_ids=cids,
                 val_images=vx, val_labels=vy, classes=classes, seed=seed, out_dir=gate_dir, baseline_preds=base,
                 augment=aug, progress=False)
        cand = np.stack([predict(load_classifier(gate_dir / f"candidate-{k}"), vx).probs.argmax(1)
                         for k in range(3)])
        row[name] = {}
        for rule, (groups, cfg) in RULES.items():
            row[name][rule] = []
            for g in groups:
                d = decide(cfg, val_labels=vy, baseline_preds=base[g], candidate_preds=cand[g], classes=classes,
                           seed=seeds[g[0]], model_seeds=[seeds[k] for k in g])
                row[name][rule].append({"seeds": d.seeds, "accepted": d.accepted, "delta": d.delta,
                                        "noise_floor": d.noise_floor, "reason_code": d.reason_code})
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


def _rate(s: dict) -> str:
    return (f"{s['accepted']}/{s['trials']} = {s['acceptance_rate']:.3f} "
            f"[{s['acceptance_rate_ci95'][0]:.3f}, {s['acceptance_rate_ci95'][1]:.3f}]")


def markdown(res: dict) -> str:
    row0 = res["rows"][0]
    lines = [f"# Gate vs a pool of exact copies and a helpful pool ({res['dataset']})", "",
             f"{res['repeats']} repeats; per repeat {row0['n_train']} training images (at most "
             f"{res['train_per_class']} a class), each copied once as the copies pool; the helpful pool is "
             f"{row0['n_helpful']} other real training-split images with correct labels (at most "
             f"{res['pool_per_class']} a class); {row0['n_val']} val images. Classifier `{res['classifier']['arch']}` "
             f"{res['classifier']['model_kwargs']}, {res['classifier']['steps']} steps, batch "
             f"{res['classifier']['batch_size']}, augment `{res['augment']}`. Gate: {res['gate']}.", "",
             "| rule | copies accepted [95% Wilson] (should be ~0) | helpful accepted [95% Wilson] (should be high) "
             "| copies mean Δ (sd) | helpful mean Δ (sd) | copies max lower bound | median CI width copies |",
             "|---|---|---|---|---|---|---|"]
    for rule in RULES:
        c, h = res["summary"]["copies"][rule], res["summary"]["helpful"][rule]
        lines.append(f"| {rule} | {_rate(c)} | {_rate(h)} | {c['delta_mean']:+.4f} ({c['delta_sd'] or 0:.4f}) | "
                     f"{h['delta_mean']:+.4f} ({h['delta_sd'] or 0:.4f}) | {c['lower_bound_max']:+.4f} | "
                     f"{c['ci_width_median']:.4f} |")
    lines += ["", f"Baseline val macro-F1 (mean over models): {res['baseline_macro_f1_mean']:.4f}. "
              f"Wall time {res['seconds']:.0f} s on {res['machine']}.",
              "", "One-seed trials are the single-seed decisions of the same models (3 per repeat, sharing the "
              "repeat's data), so they are not fully independent; 2-seed trials use models 0 and 1."]
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
    ap.add_argument("--pool-per-class", type=int, default=20,
                    help="helpful pool: this many other training-split images a class (at most half the class)")
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
            row = one_repeat(r, data, profile, args.train_per_class, args.pool_per_class, Path(tmp))
            rows.append(row)
            msg = "; ".join(f"{pool}: " + " ".join(str(sum(d["accepted"] for d in row[pool][rule]))
                                                   for rule in RULES) for pool in POOLS)
            print(f"repeat {r} accepted per rule ({time.time() - t:.0f} s): {msg}", flush=True)
    clf = profile["clf"]
    res = {"dataset": args.dataset, "repeats": args.repeats, "train_per_class": args.train_per_class,
           "pool_per_class": args.pool_per_class, "augment": profile["data"].augment,
           "image_size": profile["data"].image_size,
           "classifier": {"arch": clf.arch, "model_kwargs": clf.model_kwargs, "steps": clf.steps,
                          "batch_size": clf.batch_size, "lr": clf.lr, "synthetic_share": clf.synthetic_share},
           "gate": {"metric": G.metric, "tolerance": G.tolerance, "n_bootstrap": G.n_bootstrap,
                    "confidence": G.confidence},
           "rules": {rule: {"models": groups, "seeds": cfg.seeds, "bootstrap": cfg.bootstrap,
                            "min_delta": cfg.min_delta, "noise_floor": cfg.noise_floor}
                     for rule, (groups, cfg) in RULES.items()},
           "summary": {pool: {rule: summarise([d for row in rows for d in row[pool][rule]]) for rule in RULES}
                       for pool in POOLS},
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
