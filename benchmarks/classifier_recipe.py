"""The round-0 classifier's recipe, measured: strength (Deitsch protocol, demo split), seed noise, and speed.

    .venv/bin/python benchmarks/classifier_recipe.py [--parts deitsch demo seed_noise] [--seeds 3]

- `deitsch`: the protocol of Deitsch et al. (2019): a stratified 75/25 split of all 2,624 ELPV cells
  (seed 0), 4-class accuracy and macro-F1 on the 25 %, with the ELPV CPU profile
  (`configs/elpv-cpu.yaml`, its `classifier:` and `data:` sections). No val split exists in this
  protocol, so nothing is selected on it; the model's own argmax is scored. Mean over `--seeds`
  training seeds, with the minutes each took (pretraining included when the profile enables it).
- `demo`: the round-0 model of `vsi demo` (configs/demo.yaml), trained exactly as the loop trains it
  (same split, seed, augmentation), scored once on the demo's `test` split.
- `seed_noise`: the same demo recipe with 5 training seeds (same split), the standard deviation of
  val macro-F1 over seeds (training noise alone: the images are the same).
- `threads` is read from `benchmarks/results/threads.json` (written by benchmarks/threads.py).

Writes benchmarks/results/classifier_recipe.json (+ .md). Work folders under results/work/ make a
killed run resume (a finished model is loaded).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np

from vision_si.classifier import predict, train_classifier
from vision_si.config import RunConfig, load_config
from vision_si.data import build_augmentation, load_images, load_source, make_splits
from vision_si.metrics import classification_metrics

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = RESULTS / "work" / "classifier_recipe"
DEITSCH = {"cnn_accuracy": 0.8842, "svm_accuracy": 0.8244,
           "reference": "Deitsch et al. (2019), Solar Energy 185, 455-468: stratified 75/25 split, 4 classes"}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stratified_75_25(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=0.25, stratify=labels, random_state=seed)
    return np.sort(tr), np.sort(te)


def fit(cfg: RunConfig, x: np.ndarray, y: np.ndarray, classes: list[str], seed: int, out: Path, *,
        val: tuple[np.ndarray, np.ndarray] | None = None):
    """Train as the loop's round 0 does (same arguments)."""
    augment = build_augmentation(cfg.data.augment, x.shape[1], seed)
    start = time.time()
    clf = train_classifier(cfg.classifier, x, y, classes=classes, seed=seed, out_dir=out,
                           val_images=None if val is None else val[0], val_labels=None if val is None else val[1],
                           augment=augment, progress=False)
    return clf, time.time() - start


def scores(clf, x: np.ndarray, y: np.ndarray, classes: list[str]) -> dict:
    m = classification_metrics(y, predict(clf, x, batch_size=256).probs.argmax(1), classes)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "balanced_accuracy": m["balanced_accuracy"],
            "recall": {c: v["recall"] for c, v in m["per_class"].items()}}


def deitsch(config: str, seeds: int) -> dict:
    cfg = load_config(config)
    table = load_source(cfg.data, 0, progress=False)
    x = load_images(table, np.arange(len(table)), cfg.data, progress=False)
    y = table.labels
    tr, te = stratified_75_25(y, 0)
    rows = []
    for s in range(seeds):
        clf, seconds = fit(cfg, x[tr], y[tr], list(table.classes), cfg.seed + s, WORK / f"deitsch-{Path(config).stem}-{s}")
        rows.append({**scores(clf, x[te], y[te], list(table.classes)), "seed": cfg.seed + s, "minutes": seconds / 60})
        print(f"deitsch seed {s}: accuracy {rows[-1]['accuracy']:.4f} macro-F1 {rows[-1]['macro_f1']:.4f} "
              f"({rows[-1]['minutes']:.1f} min)", flush=True)
    return {"accuracy": [r["accuracy"] for r in rows], "macro_f1": [r["macro_f1"] for r in rows],
            "accuracy_mean": float(np.mean([r["accuracy"] for r in rows])),
            "macro_f1_mean": float(np.mean([r["macro_f1"] for r in rows])),
            "minutes_per_seed": float(np.median([r["minutes"] for r in rows])), "per_seed": rows,
            "config": config, "n_train": int(len(tr)), "n_test": int(len(te)), "reference": DEITSCH}


def demo_split(config: str):
    cfg = load_config(config)
    table = load_source(cfg.data, cfg.seed, progress=False)
    split_seed = cfg.seed if cfg.data.split.seed is None else cfg.data.split.seed
    splits = make_splits(table, cfg.data.split, split_seed)
    data = {}
    for name in ("train", "val", "test"):
        idx = np.flatnonzero(splits == name)
        data[name] = (load_images(table, idx, cfg.data, progress=False), table.labels[idx])
    return cfg, list(table.classes), data


def demo(config: str) -> dict:
    cfg, classes, data = demo_split(config)
    clf, seconds = fit(cfg, *data["train"], classes, cfg.seed, WORK / f"demo-{Path(config).stem}-0",
                       val=data["val"])
    test = scores(clf, *data["test"], classes)
    print(f"demo round-0: test macro-F1 {test['macro_f1']:.4f} accuracy {test['accuracy']:.4f} ({seconds:.0f}s)",
          flush=True)
    return {"test_macro_f1": test["macro_f1"], "test_accuracy": test["accuracy"], "test": test,
            "train_seconds": seconds, "config": config}


def seed_noise(config: str, seeds: int) -> dict:
    cfg, classes, data = demo_split(config)
    rows = []
    for s in range(seeds):
        clf, seconds = fit(cfg, *data["train"], classes, cfg.seed + s, WORK / f"demo-{Path(config).stem}-{s}",
                           val=data["val"])
        rows.append({**scores(clf, *data["val"], classes), "seed": cfg.seed + s, "seconds": seconds})
        print(f"seed noise seed {s}: val macro-F1 {rows[-1]['macro_f1']:.4f}", flush=True)
    f1 = [r["macro_f1"] for r in rows]
    return {"val_macro_f1_sd": float(np.std(f1, ddof=1)), "seeds": seeds, "val_macro_f1": f1,
            "val_macro_f1_mean": float(np.mean(f1)), "config": config, "per_seed": rows}


def markdown(res: dict) -> str:
    lines = ["# Classifier recipe (benchmarks/classifier_recipe.py)", "", f"Commit `{res['commit'][:10]}`.", ""]
    if "deitsch" in res:
        d = res["deitsch"]
        lines += ["## Deitsch et al. (2019) protocol", "",
                  f"`{d['config']}`, stratified 75/25 (seed 0): {d['n_train']} train, {d['n_test']} test images, "
                  "trained from scratch on 2 CPU cores (no ImageNet weights).", "",
                  "| | accuracy | macro-F1 | minutes per seed |", "|---|---|---|---|",
                  f"| ours, mean of {len(d['accuracy'])} seeds | {d['accuracy_mean']:.3f} "
                  f"({', '.join(f'{v:.3f}' for v in d['accuracy'])}) | {d['macro_f1_mean']:.3f} "
                  f"({', '.join(f'{v:.3f}' for v in d['macro_f1'])}) | {d['minutes_per_seed']:.1f} |",
                  f"| Deitsch et al., fine-tuned VGG-19 (ImageNet, 300 px, GPU) | {DEITSCH['cnn_accuracy']:.3f} | | |",
                  f"| Deitsch et al., SVM on hand-made features | {DEITSCH['svm_accuracy']:.3f} | | |", ""]
    if "demo_round0" in res:
        d = res["demo_round0"]
        lines += [f"Demo round-0 model (`{d['config']}`): test macro-F1 {d['test_macro_f1']:.3f}, accuracy "
                  f"{d['test_accuracy']:.3f}, trained in {d['train_seconds']:.0f} s.", ""]
    if "seed_noise" in res:
        d = res["seed_noise"]
        lines += [f"Seed noise (`{d['config']}`, {d['seeds']} seeds, one split): val macro-F1 "
                  f"{', '.join(f'{v:.3f}' for v in d['val_macro_f1'])}; sd {d['val_macro_f1_sd']:.4f}.", ""]
    if "threads" in res:
        t = res["threads"]
        lines += [f"Threads ({t.get('arch')} at {t.get('size')} px, batch {t.get('batch')}): alone "
                  f"{t['alone_ms_per_step']:.0f} ms/step, beside a competing 2-thread job "
                  f"{t['beside_competing_job_ms_per_step']:.0f} ms/step "
                  f"({t['beside_competing_job_ms_per_step'] / t['alone_ms_per_step']:.2f}x).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["deitsch", "demo", "seed_noise"],
                    choices=["deitsch", "demo", "seed_noise"])
    ap.add_argument("--deitsch-config", default="configs/elpv-cpu.yaml")
    ap.add_argument("--demo-config", default="configs/demo.yaml")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--noise-seeds", type=int, default=5)
    args = ap.parse_args()
    path = RESULTS / "classifier_recipe.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    res["commit"] = commit()
    if "deitsch" in args.parts:
        res["deitsch"] = deitsch(args.deitsch_config, args.seeds)
    if "demo" in args.parts:
        res["demo_round0"] = demo(args.demo_config)
    if "seed_noise" in args.parts:
        res["seed_noise"] = seed_noise(args.demo_config, args.noise_seeds)
    threads = RESULTS / "threads.json"
    if threads.exists():
        t = json.loads(threads.read_text())
        res["threads"] = {**t.get("vision_si_default", {}), "arch": t.get("arch"), "size": t.get("size"),
                          "batch": t.get("batch")}
    path.write_text(json.dumps(res, indent=1) + "\n")
    (RESULTS / "classifier_recipe.md").write_text(markdown(res))
    print(markdown(res))
