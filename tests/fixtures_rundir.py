"""A small, fake but realistic run directory laid out as docs/internals.md describes.

`build_run_dir(root)` writes round-00 (train, diagnose), round-01 (accepted by the gate),
round-02 (rejected by the gate, one human override), final/test.json, summary.json, events.jsonl.
`rounds` and `final` cut it short to imitate a run that stopped early. Numbers are made up but
consistent with each other (confusion matrices, per-class scores and supports agree). The filter's
files are written by `FilterResult.save` and the manifest and gate decision in their stages' formats,
since the report reads them as typed results.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from vision_si.filter import FilterResult

REASONS = ("off_class", "too_easy", "unrealistic", "memorised", "leak", "duplicate")


def _png(path: Path, seed: int, size: int = 16, mode: str = "L") -> None:
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode).save(path)


def _json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")


def _csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _metrics(cm: np.ndarray, classes: list[str]) -> dict:
    tp = np.diag(cm).astype(float)
    support, predicted = cm.sum(1), cm.sum(0)
    rec = tp / np.maximum(support, 1)
    prec = tp / np.maximum(predicted, 1)
    f1 = np.where(rec + prec > 0, 2 * rec * prec / np.maximum(rec + prec, 1e-12), 0.0)
    acc = float(tp.sum() / cm.sum())
    return {"accuracy": acc, "accuracy_ci": [acc - 0.06, min(1.0, acc + 0.05)],
            "balanced_accuracy": float(rec.mean()), "balanced_accuracy_ci": [float(rec.mean()) - 0.08,
                                                                             float(rec.mean()) + 0.07],
            "macro_f1": float(f1.mean()), "macro_f1_ci": [float(f1.mean()) - 0.08, float(f1.mean()) + 0.07],
            "per_class": {c: {"recall": float(rec[k]), "precision": float(prec[k]), "f1": float(f1[k]),
                              "support": int(support[k])} for k, c in enumerate(classes)},
            "confusion": cm.tolist()}


def _diagnose(d: Path, classes: list[str], seed: int, plots: bool = True) -> None:
    """diagnosis.json and its CSVs as `Diagnosis.save` writes them; PNGs as the plots write them."""
    rng = np.random.default_rng(seed)
    k = len(classes)
    per_class = [{"class_index": j, "class_name": c, "support": 10, "n_train": 30 - 5 * j, "train_share": 0.3,
                  "recall": 0.8 - 0.2 * (j == k - 1), "recall_ci": [0.5 - 0.2 * (j == k - 1), 0.95],
                  "precision": 0.75, "precision_ci": [0.5, 0.9], "f1": 0.7, "f1_ci": [0.5, 0.85],
                  "error_rate": 0.2, "mean_margin": 0.3, "weak": j == k - 1, "confused_with": []}
                 for j, c in enumerate(classes)]
    slices = [{"slice_id": f"c{k - 1}-s{j}", "class_index": k - 1, "class_name": classes[-1], "cluster": j,
               "n_train": 12 - 3 * j, "n_val": 5, "n_val_errors": 3 - 2 * j, "error_rate": 0.6 - 0.4 * j,
               "error_ci": [0.23, 0.88], "decision_lower": 0.1, "class_error_rate": 0.4, "mean_margin": -0.1,
               "dominant_wrong_class": classes[0], "dominant_wrong_count": 2, "weak": j == 0,
               "exemplar_ids": ["elpv:2t000", "elpv:2t001"], "val_error_ids": ["elpv:2v000"]} for j in range(2)]
    budget = [{"class_index": k - 1, "class_name": classes[-1], "slice_id": slices[0]["slice_id"], "count": 8,
               "exemplar_ids": ["elpv:2t000", "elpv:2t001"], "mode": "exemplar", "strength": 0.5, "deficit": 4.0}]
    confusion = (np.full((k, k), 1) + np.diag([8 - 4 * (j == k - 1) for j in range(k)])).tolist()
    _json(d / "diagnosis.json", {
        "schema": 1, "seed": seed, "classes": classes, "n_val": 30, "n_train": 75,
        "overall": {"accuracy": {"value": 0.7, "ci": [0.6, 0.8]}, "macro_f1": {"value": 0.68, "ci": [0.55, 0.8]}},
        "per_class": per_class, "confusion": confusion,
        "confused_pairs": [{"true": classes[-1], "predicted": classes[0], "count": 2, "rate": 0.2}],
        "slices": slices, "budget": budget, "notes": [], "timings_s": {}})
    for name, rows in (("per_class", per_class), ("slices", slices), ("budget", budget)):
        _csv(d / f"{name}.csv", list(rows[0]), [[";".join(map(str, v)) if isinstance(v, list) and not key.endswith("_ci")
                                                 else v for key, v in row.items()] for row in rows])
    if plots:
        for name in ("confusion", "recall", "embedding_map"):
            _png(d / f"{name}.png", int(rng.integers(1 << 30)), size=48, mode="RGB")
    for s in slices:
        _png(d / "slices" / f"{s['slice_id']}.png", int(rng.integers(1 << 30)), size=32, mode="RGB")


def _synthetic_round(rd: Path, r: int, classes: list[str], accepted: bool, n: int = 10) -> dict:
    tag = rd / f"round-{r:02d}"
    gen = tag / "generate"
    rows, scores = [], []
    reasons = ["", "", "", "off_class", "too_easy", "duplicate", "", "unrealistic", "too_easy", ""]
    for i in range(n):
        sid = f"syn-r{r:02d}-{i:06d}"
        _png(gen / "images" / f"{sid}.png", 1000 * r + i)
        cls = i % len(classes)
        rows.append({"id": sid, "path": f"images/{sid}.png", "sha256": f"{r:02d}{i:062d}", "class_index": cls,
                     "class_name": classes[cls], "slice": f"c{cls}-s0", "mode": "exemplar", "preset": "quick",
                     "generator_sha256": "ab" * 32, "seed": 7 * i, "exemplar_ids": ["elpv:0001"],
                     "strength": 0.5, "steps": 2, "guidance": None, "seconds": 0.01})
        reason = reasons[i % len(reasons)]
        decision, overridden = ("rejected" if reason else "accepted"), False
        if r == 2 and i == 3:  # a human accepted an image the critic called off-class (reason kept)
            decision, overridden = "accepted", True
        if r == 2 and i == 0:  # and rejected one the filter had accepted
            decision, reason, overridden = "rejected", "human_review", True
        scores.append([sid, cls, 0.9 - 0.05 * i, 0.3, 1.2, 0.4, 0.1, 0.2, decision, reason, reason, overridden])
    gen.mkdir(parents=True, exist_ok=True)
    (gen / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows), encoding="utf-8")
    header = ["id", "class", "fidelity", "informativeness", "realism_distance", "memorisation_cosine",
              "leak_cosine", "duplicate_cosine", "decision", "reason", "failed", "overridden"]
    rejected = {k: sum(1 for s in scores if s[9] == k and s[8] == "rejected") for k in (*REASONS, "human_review")}
    n_acc = sum(1 for s in scores if s[8] == "accepted")
    quantiles = {"min": 0.05, "p05": 0.1, "p50": 0.3, "p95": 0.5, "max": 0.6}
    FilterResult(  # as the filter stage writes it: scores.csv and filter.json
        rows=[dict(zip(header, row, strict=True)) for row in scores],
        accepted_ids=[s[0] for s in scores if s[8] == "accepted"], counts=rejected, thresholds={},
        enabled=["leakage", "memorisation", "fidelity", "realism", "duplicate", "informativeness"],
        leak_pixel_threshold=0.95, overridden_ids=[s[0] for s in scores if s[11]], review_refused_ids=[],
        closest_real={"candidates": {"cosine_distance": quantiles, "pixel_distance": quantiles},
                      "real_train": {"cosine_distance": quantiles, "pixel_distance": quantiles, "n_sampled": 75}},
    ).save(tag / "filter")
    delta = 0.06 if accepted else -0.01
    gate = {"decision": "accepted" if accepted else "rejected", "metric": "macro_f1",
            "before": {"value": 0.61, "ci": [0.52, 0.70]}, "after": {"value": 0.61 + delta, "ci": [0.55, 0.75]},
            "delta": {"value": delta, "ci": [delta - 0.04, delta + 0.04]}}
    per_class = {c: {"before": 0.7, "after": 0.7 + (0.1 if k == len(classes) - 1 else -0.01) * (1 if accepted else -1),
                     "support": 8, "allowed": 0.125} for k, c in enumerate(classes)}
    for v in per_class.values():
        v["delta"] = v["after"] - v["before"]
    from vision_si.gate import Estimate, GateDecision, Look

    GateDecision(  # as run_gate writes it
        accepted=accepted, reason="lower end of the improvement above min_delta" if accepted
        else "lower end of the improvement -0.05 is not above min_delta 0",
        reason_code="help" if accepted else "no_confident_gain", admit="superiority", metric="macro_f1",
        before=Estimate(**gate["before"]), after=Estimate(**gate["after"]),
        delta=Estimate(**gate["delta"], method="t-interval over 3 paired seeds"),
        superiority=accepted, non_inferiority=True, harm=False, min_delta=0.0, margin=0.01,
        checks={"macro_f1": {"delta": delta, "ci": [delta - 0.05, delta + 0.05], "margin": 0.03, "passed": True},
                "recall": {"passed": accepted, "regressions": [] if accepted else [classes[-1]], "tolerance": 0.05,
                           "tolerance_min_images": 1}},
        per_class=per_class, regressions=[] if accepted else [classes[-1]],
        looks=[Look(n_seeds=3, level=0.0001, delta=delta, lower=delta - 0.04, upper=delta + 0.04,
                    outcome="accept" if accepted else "continue"),
               *([] if accepted else [Look(6, 0.006, delta, delta - 0.04, delta + 0.04, "reject")])],
        seeds=[0, 1, 2] if accepted else [0, 1, 2, 3, 4, 5], n_judge=30, n_select=30,
    ).save(tag / "gate")
    if accepted:
        _diagnose(tag / "diagnose", classes, seed=r, plots=False)  # report draws its own
    return {"round": r, "generated": n, "accepted_by_filter": n_acc, "rejected_by_filter": rejected, "gate": gate}


def build_run_dir(root: Path, *, classes: list[str] | None = None, rounds: int = 2, final: bool = True,
                  name: str = "fixture", images_per_round: int = 10) -> Path:
    """Write a run directory under `root` and return its path."""
    classes = list(classes or ["functional", "mild", "defective"])
    rd = Path(root) / f"20250101-120000-{name}"
    rd.mkdir(parents=True)
    (rd / "config.yaml").write_text(f"name: {json.dumps(name)}\nseed: 0\ndata:\n  source: elpv\n", encoding="utf-8")
    _json(rd / "env.json", {"vision_si": "0.1.0", "python": "3.11", "device": "cpu", "seed": 0,
                            "started": "2025-01-01T12:00:00"})
    split_rows, per_class = [], {}
    for k, c in enumerate(classes):
        counts = {"train": 30 - 5 * k, "val": 10, "test": 10}
        per_class[c] = counts
        for split, n in counts.items():
            split_rows += [[f"elpv:{k}{split[0]}{i:03d}", f"img/{k}/{i}.png", f"{k}{i:063d}", c, "", split]
                           for i in range(n)]
    _csv(rd / "splits.csv", ["id", "source", "sha256", "class", "group", "split"], split_rows)
    (rd / "round-00" / "train").mkdir(parents=True)
    _json(rd / "round-00" / "train" / "model.json", {"arch": "resnet10t", "classes": classes})
    _diagnose(rd / "round-00" / "diagnose", classes, seed=0)
    timings = {"round-00/train": 12.5, "round-00/diagnose": 1.5}
    summaries = []
    for r in range(1, rounds + 1):
        summaries.append(_synthetic_round(rd, r, classes, accepted=(r == 1), n=images_per_round))
        timings.update({f"round-{r:02d}/generate": 20.0 + r, f"round-{r:02d}/filter": 3.0, f"round-{r:02d}/gate": 25.0})
    events = [{"time": "2025-01-01T12:00:00", "event": "stage_done", "stage": s, "seconds": t}
              for s, t in timings.items()]
    if not final:
        (rd / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
        return rd
    k = len(classes)
    base_cm = np.full((k, k), 1) + np.diag([8 - (j == k - 1) * 4 for j in range(k)])
    final_cm = np.full((k, k), 1) + np.diag([8 - (j == k - 1) * 2 for j in range(k)])
    test = {"n_images": int(base_cm.sum()), "synthetic_in_eval_splits": 0,
            "baseline": _metrics(base_cm, classes), "final": _metrics(final_cm, classes)}
    _json(rd / "final" / "test.json", test)
    timings["final"] = 2.0
    events.append({"time": "2025-01-01T12:05:00", "event": "test_evaluated", "models": ["baseline", "final"]})
    events.append({"time": "2025-01-01T12:05:01", "event": "stage_done", "stage": "final", "seconds": 2.0})
    (rd / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    n_total = sum(sum(v.values()) for v in per_class.values())
    _json(rd / "summary.json", {
        "dataset": {"name": "elpv", "n_images": n_total,
                    "splits": {s: sum(v[s] for v in per_class.values()) for s in ("train", "val", "test")},
                    "per_class": per_class},
        "classes": classes, "rounds": summaries,
        "test": {side: test[side] for side in ("baseline", "final")},
        "timings_s": timings, "synthetic_in_eval_splits": 0})
    return rd
