"""Hidden-stratification benchmark: does the diagnosis find planted sub-groups the classifier fails on?

On real data (scikit-learn digits at 16 px, ELPV at 32 px) a rare sub-group is planted in some
classes: images of class A transformed to resemble another class, 8% (digits) or 7% (ELPV) of
the class, 85% (digits) or 97% (ELPV) of them placed in `val` so the training set holds only a handful (the realistic
case: rare in training). Control groups are planted the same way but spread over train and val
like everything else; the classifier learns them, so they must NOT be reported. Truth = the val
images of the failing groups.

A small classifier is trained on the train split (`vision_si.classifier` when it is importable,
else a minimal timm loop in this file), then on the same val embeddings and predictions:

* `vsi-gmm`, `vsi-hdbscan`: `vision_si.diagnose.diagnose`; flagged = val members of weak slices.
* `cleanlab`: cleanlab's `Datalab` issue type `underperforming_group` (val features + pred_probs).
* `errors-only`: the naive baseline, flag every misclassified val image (one slice per class).

Reported per method over seeds: image-level precision/recall/F1 against the truth, share of control
images flagged, planted groups recovered (a reported slice whose val members are ≥ 50% one planted
group and hold ≥ 50% of it), slice precision (reported slices that recover a group), and time.
On ELPV, how the clusters relate to the cell type (mono/poly), which the model never sees.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/slices.py [--seeds 0 1 2] [--datasets digits elpv]
        [--oof K] [--stability N] [--quick]

`--oof K` also judges train images out of fold (`vision_si.oof`, K cross-fitted models with the same
recipe, each predicting the fold it did not train on; `vsi-*-oof` rows): val scoring is unchanged, and
`train_recall` says how much of the failing groups' train images the weak slices cover. `--stability N`
measures each weak slice's stability over N re-clusterings (reported per slice and as a mean).
`--quick` is a smoke run (digits, one seed, 150 steps), not a result.

Writes benchmarks/results/slices.json and benchmarks/results/slices.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_mutual_info_score

from vision_si.config import ClassifierConfig, DataConfig, DiagnoseConfig
from vision_si.data.arrays import LabelledImages
from vision_si.diagnose import diagnose

RESULTS = Path(__file__).resolve().parent / "results"
VAL_FRACTION = 0.4


# --------------------------------------------------------------------------- planted sub-groups


def rot180(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x[..., ::-1, ::-1].copy()


def mirror(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x[..., :, ::-1].copy()


def close_left(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A vertical stroke down the left side: a 3 closed into something 8-like."""
    x = x.copy()
    x[..., 3:13, 3:5] = np.maximum(x[..., 3:13, 3:5], 0.9)
    return x


def erase_right(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = x.copy()
    x[..., :, x.shape[-1] // 2:] = 0
    return x


def dark_corner(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A dark, inactive-looking corner region: a working cell that resembles a defective one."""
    x = x.copy()
    s = x.shape[-1]
    h = int(s * (0.44 + 0.2 * rng.random()))
    rows = slice(None, h) if rng.random() < 0.5 else slice(s - h, None)
    cols = slice(None, h) if rng.random() < 0.5 else slice(s - h, None)
    x[..., rows, cols] *= 0.25
    return x


def fill_cracks(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grey-level dilation hides thin dark cracks (the classifier still learns these: a control)."""
    t = F.max_pool2d(torch.from_numpy(np.ascontiguousarray(x))[None], 5, 1, 2)[0]
    return (t * 1.1).clamp(0, 1).numpy().astype(np.float32)


@dataclass
class Plant:
    class_name: str
    name: str
    transform: Callable[[np.ndarray, np.random.Generator], np.ndarray]
    fraction: float
    failing: bool  # designed to fail: rare in training; controls are spread like the rest
    looks_like: str
    in_val: float = 0.85  # share of a failing group placed in val


PLANTS = {
    "digits": [Plant("6", "rot180", rot180, 0.08, True, "9"),
               Plant("2", "mirror", mirror, 0.08, True, "5/3"),
               Plant("7", "rot180", rot180, 0.08, True, "L-shape / 1"),
               Plant("3", "closed-left", close_left, 0.08, False, "8"),
               Plant("0", "erased-right", erase_right, 0.08, False, "(")],
    "elpv": [Plant("functional", "dark-corner", dark_corner, 0.07, True, "defective", in_val=0.97),
             Plant("defective", "filled-cracks", fill_cracks, 0.07, False, "functional")],
}


def load_dataset(name: str) -> dict:
    from vision_si.data.images import load_images
    from vision_si.data.sources import load_source

    size = 16 if name == "digits" else 32
    cfg = DataConfig(source=name, image_size=size, channels=1, resize="resize")
    table = load_source(cfg, seed=0, progress=False)
    images = load_images(table, np.arange(len(table)), cfg)
    types = np.array([m.get("type", "") for m in table.metadata], dtype=object)
    return {"images": images, "labels": table.labels, "classes": list(table.classes),
            "ids": np.array(table.ids, dtype=object), "types": types}


def plant(data: dict, plants: list[Plant], seed: int) -> dict:
    """Transform the planted images in place of the originals; choose the split (planted: mostly val)."""
    rng = np.random.default_rng(seed)
    images = data["images"].copy()
    y = data["labels"]
    group = np.full(y.size, -1)
    is_val = rng.random(y.size) < VAL_FRACTION
    for g, p in enumerate(plants):
        k = data["classes"].index(p.class_name)
        members = rng.permutation(np.flatnonzero(y == k))[: int(round(p.fraction * (y == k).sum()))]
        for i in members:
            images[i] = p.transform(images[i], rng)
        group[members] = g
        if p.failing:
            is_val[members] = rng.random(members.size) < p.in_val
    return {**data, "images": images, "group": group, "is_val": is_val}


# --------------------------------------------------------------------------- classifier


def classifier_config(steps: int) -> ClassifierConfig:
    """The benchmark's recipe, for the diagnosed model and the out-of-fold models alike."""
    return ClassifierConfig(arch="test_resnet", steps=steps, batch_size=64, lr=3e-3, warmup_steps=steps // 10,
                            sampling="balanced", device="cpu")


def train_and_embed(train_x, train_y, all_x, n_classes: int, seed: int, steps: int, out_dir: Path) -> tuple:
    """(probs, embeddings) for `all_x` and which trainer was used."""
    try:
        from vision_si.classifier import predict, train_classifier
    except ImportError:
        train_classifier = None
    if train_classifier is not None:
        clf = train_classifier(classifier_config(steps), train_x, train_y, classes=[str(k) for k in range(n_classes)], seed=seed,
                               out_dir=out_dir, augment=None, progress=False, checkpoint_every=steps)
        pred = predict(clf, all_x, batch_size=512)
        return np.asarray(pred.probs), np.asarray(pred.embeddings), "vision_si.classifier"
    return (*_minimal_train(train_x, train_y, all_x, n_classes, seed, steps), "benchmark's own minimal timm loop")


def _minimal_train(train_x, train_y, all_x, n_classes, seed, steps):
    import timm

    torch.manual_seed(seed)  # timm initialises weights through the global generator
    model = timm.create_model("test_resnet", num_classes=n_classes, in_chans=train_x.shape[1])
    g = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(train_x), torch.from_numpy(train_y)
    weights = torch.from_numpy(1.0 / np.bincount(train_y, minlength=n_classes)[train_y])  # class-balanced
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    model.train()
    for _ in range(steps):
        b = torch.multinomial(weights, 64, replacement=True, generator=g)
        loss = F.cross_entropy(model(x[b]), y[b], label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.inference_mode():
        feats = model.forward_head(model.forward_features(torch.from_numpy(all_x)), pre_logits=True)
        probs = model.get_classifier()(feats).softmax(1)
    return probs.numpy().astype(np.float64), feats.numpy()


# --------------------------------------------------------------------------- scoring


def score(flag_sets: list[np.ndarray], truth_group: np.ndarray, failing: list[int], controls: list[int]) -> dict:
    """Image-level and group-level quality of reported slices (boolean masks over val images)."""
    flagged = np.any(flag_sets, axis=0) if flag_sets else np.zeros(truth_group.size, bool)
    truth = np.isin(truth_group, failing)
    tp = int((flagged & truth).sum())
    precision = tp / flagged.sum() if flagged.sum() else 0.0
    recall = tp / truth.sum() if truth.sum() else 0.0
    recovered, good_slices = set(), 0
    for s in flag_sets:
        if not s.any():
            continue
        hit = False
        for g in failing:
            in_g = truth_group == g
            if (s & in_g).sum() >= 0.5 * s.sum() and (s & in_g).sum() >= 0.5 * in_g.sum():
                recovered.add(g)
                hit = True
        good_slices += hit
    control = np.isin(truth_group, controls)
    n_slices = int(sum(s.any() for s in flag_sets))
    return {"precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "n_flagged": int(flagged.sum()), "n_truth": int(truth.sum()),
            "control_flagged": float((flagged & control).sum() / control.sum()) if control.any() else None,
            "groups_recovered": len(recovered), "groups_planted": len(failing),
            "slices_reported": n_slices, "slice_precision": good_slices / n_slices if n_slices else None}


def run_cleanlab(labels, probs, emb, seed: int) -> tuple[list[np.ndarray], float]:
    from cleanlab import Datalab

    np.random.seed(seed)  # cleanlab draws from numpy's global generator
    t = time.perf_counter()
    lab = Datalab(data={"label": labels}, label_name="label", verbosity=0)
    lab.find_issues(features=emb, pred_probs=probs, issue_types={"underperforming_group": {}})
    flagged = lab.get_issues("underperforming_group")["is_underperforming_group_issue"].to_numpy(bool)
    return [flagged], time.perf_counter() - t


def run_one(name: str, data: dict, seed: int, steps: int, work: Path, oof_folds: int = 0,
            stability: int = 0) -> dict:
    plants = PLANTS[name]
    d = plant(data, plants, seed)
    v, t = d["is_val"], ~d["is_val"]
    k = len(d["classes"])
    t0 = time.perf_counter()
    probs, emb, trainer = train_and_embed(d["images"][t], d["labels"][t], d["images"], k, seed, steps, work / name)
    train_s = time.perf_counter() - t0
    y, pred = d["labels"], probs.argmax(1)
    failing = [g for g, p in enumerate(plants) if p.failing]
    controls = [g for g, p in enumerate(plants) if not p.failing]
    groups = []
    for g, p in enumerate(plants):
        c = d["classes"].index(p.class_name)
        in_g, rest = v & (d["group"] == g), v & (y == c) & (d["group"] != g)
        wrong = np.bincount(pred[in_g & (pred != c)], minlength=k)
        groups.append({"class": p.class_name, "group": p.name, "failing": p.failing, "looks_like": p.looks_like,
                       "n_train": int((t & (d["group"] == g)).sum()), "n_val": int(in_g.sum()),
                       "val_error": float((pred[in_g] != c).mean()), "rest_of_class_val_error": float((pred[rest] != c).mean()),
                       "errors_go_to": d["classes"][int(wrong.argmax())] if wrong.any() else None})
    vg = d["group"][v]
    out = {"dataset": name, "seed": seed, "trainer": trainer, "train_seconds": train_s, "steps": steps,
           "val_accuracy": float((pred[v] == y[v]).mean()), "n_val": int(v.sum()), "n_train": int(t.sum()),
           "planted_groups": groups, "methods": {}}
    oof = None
    if oof_folds:
        from vision_si.oof import out_of_fold

        t1 = time.perf_counter()
        oof = out_of_fold(classifier_config(steps), d["images"][t], y[t], classes=[str(c) for c in range(k)],
                          n_folds=oof_folds, seed=seed, out_dir=work / name / "oof")
        out["oof_seconds"] = time.perf_counter() - t1
    metadata = {"type": np.concatenate([d["types"][v], d["types"][t]])} if name == "elpv" else None
    variants = [(m, None) for m in ("gmm", "hdbscan")] + ([(m, oof) for m in ("gmm", "hdbscan")] if oof else [])
    for method, judged in variants:
        cfg = DiagnoseConfig(cluster_method=method, n_bootstrap=200, stability_resamples=stability)
        t1 = time.perf_counter()
        diag = diagnose(cfg, classes=d["classes"], val=LabelledImages.of_labels(y[v], d["ids"][v]), val_probs=probs[v],
                        val_embeddings=emb[v], train=LabelledImages.of_labels(y[t], d["ids"][t]),
                        train_embeddings=emb[t], seed=seed, metadata=metadata,
                        train_probs=None if judged is None else judged.probs,
                        train_folds=None if judged is None else judged.folds)
        secs = time.perf_counter() - t1
        val_slices = diag.members["slice_id"][: v.sum()]
        sets = [val_slices == s.slice_id for s in diag.weak_slices]
        weak_train = np.isin(diag.members["slice_id"][v.sum():], [s.slice_id for s in diag.weak_slices])
        truth_train = np.isin(d["group"][t], failing)
        res = {**score(sets, vg, failing, controls), "seconds": secs,
               "train_recall": float((weak_train & truth_train).sum() / truth_train.sum()) if truth_train.any() else None,
               "stability": float(np.mean([s.stability for s in diag.weak_slices]))
               if stability and diag.weak_slices else None,
               "weak_slices": [{"slice": s.slice_id, "class": s.class_name, "n_val": s.n_val, "n_judged": s.n_judged,
                                "error": s.error_rate, "class_error": s.class_error_rate, "stability": s.stability,
                                "description": s.description} for s in diag.weak_slices]}
        if name == "elpv":
            res["cell_type"] = cell_type_relation(diag, d, v, t)
        out["methods"][f"vsi-{method}" + ("-oof" if judged is not None else "")] = res
    sets, secs = run_cleanlab(y[v], probs[v], emb[v], seed)
    out["methods"]["cleanlab"] = {**score(sets, vg, failing, controls), "seconds": secs}
    naive = [(y[v] == c) & (pred[v] != c) for c in range(k)]
    out["methods"]["errors-only"] = {**score(naive, vg, failing, controls), "seconds": 0.0}
    return out


def cell_type_relation(diag, d: dict, v: np.ndarray, t: np.ndarray) -> dict:
    """Per class: adjusted mutual information between cluster and mono/poly; each weak slice's mono share."""
    ids = np.concatenate([d["ids"][v], d["ids"][t]])
    types = np.concatenate([d["types"][v], d["types"][t]])
    labels = np.concatenate([d["labels"][v], d["labels"][t]])
    slices = diag.members["slice_id"]
    if not (diag.members["id"] == ids).all():  # members are val then train, as passed
        raise RuntimeError("diagnosis members are not in the order val, train")
    per_class = {}
    for k, cname in enumerate(d["classes"]):
        m = labels == k
        n_clusters = len(set(slices[m].tolist()))
        per_class[cname] = {"clusters": n_clusters, "mono_share": float((types[m] == "mono").mean()),
                            "ami_cluster_vs_type": float(adjusted_mutual_info_score(types[m], slices[m]))
                            if n_clusters > 1 else 0.0}
    weak = {s.slice_id: float((types[slices == s.slice_id] == "mono").mean()) for s in diag.weak_slices}
    return {"per_class": per_class, "weak_slice_mono_share": weak}


# --------------------------------------------------------------------------- report


def summarise(runs: list[dict]) -> dict:
    out = {}
    for name in sorted({r["dataset"] for r in runs}):
        rs = [r for r in runs if r["dataset"] == name]
        methods = {}
        for m in rs[0]["methods"]:
            vals = [r["methods"][m] for r in rs]
            row = {}
            for key in ("precision", "recall", "f1", "control_flagged", "slice_precision", "seconds", "train_recall",
                        "stability"):
                xs = [x[key] for x in vals if x.get(key) is not None]
                row[key] = {"mean": float(np.mean(xs)), "sd": float(np.std(xs))} if xs else None
            row["groups_recovered"] = f"{sum(x['groups_recovered'] for x in vals)}/{sum(x['groups_planted'] for x in vals)}"
            methods[m] = row
        planted = {}
        for g in range(len(rs[0]["planted_groups"])):
            gs = [r["planted_groups"][g] for r in rs]
            planted[f"{gs[0]['class']}:{gs[0]['group']}"] = {
                "failing": gs[0]["failing"], "looks_like": gs[0]["looks_like"],
                "n_train": [x["n_train"] for x in gs], "n_val": [x["n_val"] for x in gs],
                "val_error": float(np.mean([x["val_error"] for x in gs])),
                "rest_of_class_val_error": float(np.mean([x["rest_of_class_val_error"] for x in gs]))}
        out[name] = {"seeds": [r["seed"] for r in rs], "val_accuracy": float(np.mean([r["val_accuracy"] for r in rs])),
                     "trainer": rs[0]["trainer"], "planted": planted, "methods": methods}
    return out


def markdown(summary: dict, runs: list[dict]) -> str:
    def fmt(x):
        return "–" if x is None else f"{x['mean']:.2f} ± {x['sd']:.2f}"

    lines = ["# Hidden-stratification benchmark (benchmarks/slices.py)", ""]
    for name, s in summary.items():
        lines += [f"## {name}: seeds {s['seeds']}, val accuracy {s['val_accuracy']:.3f}, trainer: {s['trainer']}", "",
                  "Planted groups (val error of the group beside the rest of its class, mean over seeds):", "",
                  "| group | designed to fail | looks like | n train | n val | group val error | rest of class |",
                  "|---|---|---|---|---|---|---|"]
        for g, p in s["planted"].items():
            lines.append(f"| {g} | {'yes' if p['failing'] else 'no (control)'} | {p['looks_like']} | "
                         f"{p['n_train']} | {p['n_val']} | {p['val_error']:.2f} | {p['rest_of_class_val_error']:.2f} |")
        lines += ["", "| method | image precision | image recall | image F1 | controls flagged | groups recovered "
                  "| slice precision | train recall | stability | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
        for m, r in s["methods"].items():
            lines.append(f"| {m} | {fmt(r['precision'])} | {fmt(r['recall'])} | {fmt(r['f1'])} | "
                         f"{fmt(r['control_flagged'])} | {r['groups_recovered']} | {fmt(r['slice_precision'])} | "
                         f"{fmt(r.get('train_recall'))} | {fmt(r.get('stability'))} | {fmt(r['seconds'])} |")
        if name == "elpv":
            lines += ["", "Cell type (mono/poly, never seen by the model) against the clusters (vsi-gmm):", "",
                      "| seed | class | clusters | mono share | AMI(cluster, type) |", "|---|---|---|---|---|"]
            for r in (r for r in runs if r["dataset"] == "elpv"):
                for cname, c in r["methods"]["vsi-gmm"]["cell_type"]["per_class"].items():
                    lines.append(f"| {r['seed']} | {cname} | {c['clusters']} | {c['mono_share']:.2f} | "
                                 f"{c['ami_cluster_vs_type']:.2f} |")
                weak = r["methods"]["vsi-gmm"]["cell_type"]["weak_slice_mono_share"]
                if weak:
                    lines.append(f"| {r['seed']} | weak slices' mono share | "
                                 + ", ".join(f"{k}: {v:.2f}" for k, v in weak.items()) + " | | |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--datasets", nargs="+", default=["digits", "elpv"], choices=list(PLANTS))
    ap.add_argument("--steps", type=int, nargs=2, default=[400, 600], metavar=("DIGITS", "ELPV"))
    ap.add_argument("--out", default=str(RESULTS / "slices"))
    ap.add_argument("--work", default=str(RESULTS / "work" / "slices"))  # git-ignored checkpoints
    ap.add_argument("--oof", type=int, default=0, metavar="K", help="also judge train out of fold with K folds")
    ap.add_argument("--stability", type=int, default=0, metavar="N", help="re-clusterings per diagnosis")
    ap.add_argument("--quick", action="store_true", help="smoke run: digits, one seed, 150 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.datasets, args.seeds, args.steps = ["digits"], args.seeds[:1], [150, 150]
        if args.out == str(RESULTS / "slices"):  # a smoke run never overwrites the benchmark's results
            args.out = str(RESULTS / "work" / "slices-quick")
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    runs = []
    for name in args.datasets:
        data = load_dataset(name)
        steps = args.steps[0] if name == "digits" else args.steps[1]
        for seed in args.seeds:
            r = run_one(name, data, seed, steps, Path(args.work) / f"seed{seed}", args.oof, args.stability)
            runs.append(r)
            print(f"{name} seed {seed}: val acc {r['val_accuracy']:.3f} ({r['trainer']}, {r['train_seconds']:.0f} s); "
                  + "; ".join(f"{m} P {x['precision']:.2f} R {x['recall']:.2f} groups {x['groups_recovered']}/"
                              f"{x['groups_planted']} ctrl {x['control_flagged'] if x['control_flagged'] is None else round(x['control_flagged'], 2)} "
                              f"{x['seconds']:.2f}s" for m, x in r["methods"].items()), flush=True)
    summary = summarise(runs)
    result = {"summary": summary, "runs": runs, "total_seconds": time.perf_counter() - t0,
              "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                          "torch": torch.__version__}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(summary, runs) + f"\nTotal run time {result['total_seconds']:.0f} s.\n")
    print(f"total {result['total_seconds']:.0f} s; wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
