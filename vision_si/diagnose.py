"""Diagnosis: where the classifier fails on real `val` images, and how many images each failure deserves.

A functional core on plain arrays (labels, predicted probabilities, embeddings), so any model plugs
in. `diagnose` returns a `Diagnosis`; weak slices are found by `vision_si.slices`, the budget is
allocated by `vision_si.budget` (both document their rules); its plots live beside the report
(`vision_si.report_plots`).

Files written by `Diagnosis.save(out_dir)`:

`diagnosis.json`::

    {
      "schema": 1, "seed": int, "config": {DiagnoseConfig fields},
      "classes": [str], "n_val": int, "n_train": int,
      "overall": {"accuracy": {"value": x, "ci": [lo, hi]}, "balanced_accuracy": {...},
                  "macro_f1": {...}, "ece": x},
      "per_class": [{"class_index", "class_name", "support", "n_train", "train_share",
                     "recall", "recall_ci", "precision", "precision_ci", "f1", "f1_ci",
                     "error_rate", "mean_margin", "weak", "confused_with": [[class_name, count]]}],
      "confusion": [[int]],                 rows: true class, columns: predicted
      "confused_pairs": [{"true", "predicted", "count", "rate"}],   most frequent first
      "slices": [SliceReport fields],       every cluster; "weak" marks the weak slices
      "budget": [Allocation fields],
      "notes": [str], "timings_s": {step: seconds}
    }

Recall and precision intervals are Wilson intervals; F1, accuracy, balanced accuracy and macro-F1
intervals are percentile bootstraps over val images (drawn as multinomial confusion matrices, the
same distribution, bounded memory). `per_class.csv`, `slices.csv` and `budget.csv` hold the same
rows flat (lists joined by `;`); `members.csv` (id, split, class_index, slice_id) says which cluster
every real image fell in, so the plots and the report can outline slices.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix

from vision_si.budget import Allocation, allocate_budget, weak_classes_of
from vision_si.config import DiagnoseConfig
from vision_si.data.arrays import LabelledImages
from vision_si.errors import DataError, RunDirError
from vision_si.metrics import (
    bootstrap_confusions,
    confusion_metric_samples,
    expected_calibration_error,
    per_class_scores,
    wilson_interval,
)
from vision_si.slice_description import check_metadata, describe_slices
from vision_si.slices import CLASSIFIER_VIEW, SliceReport, find_slices

SCHEMA = 1
N_PAIRS = 10


@dataclass
class ClassReport:
    class_index: int
    class_name: str
    support: int
    n_train: int
    train_share: float
    recall: float
    recall_ci: list[float]
    precision: float
    precision_ci: list[float]
    f1: float
    f1_ci: list[float]
    error_rate: float
    mean_margin: float | None
    weak: bool
    confused_with: list[list[Any]] = field(default_factory=list)


@dataclass
class Diagnosis:
    classes: list[str]
    seed: int
    config: dict[str, Any]
    n_val: int
    n_train: int
    overall: dict[str, Any]
    per_class: list[ClassReport]
    confusion: list[list[int]]
    confused_pairs: list[dict[str, Any]]
    slices: list[SliceReport]
    budget: list[Allocation]
    notes: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    members: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # id/split/class/slice arrays
    # optional (a diagnosis saved before them loads with these): which images' errors were judged
    # ("val", or "val+oof-train" with out-of-fold train predictions), and the views clustered
    judged: str = "val"
    views: list[str] = field(default_factory=lambda: [CLASSIFIER_VIEW])

    @property
    def weak_slices(self) -> list[SliceReport]:
        return [s for s in self.slices if s.weak]

    @property
    def weak_classes(self) -> list[int]:
        return [c.class_index for c in self.per_class if c.weak]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "members"}
        d = json.loads(json.dumps(d, default=_jsonable))
        return {"schema": SCHEMA, **d}

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_text(out / "diagnosis.json", json.dumps(self.to_dict(), indent=2))
        _write_csv(out / "per_class.csv", [asdict(c) for c in self.per_class], ClassReport)
        _write_csv(out / "slices.csv", [asdict(s) for s in self.slices], SliceReport)
        _write_csv(out / "budget.csv", [asdict(a) for a in self.budget], Allocation)
        m = self.members
        # optional columns after the four fixed ones: oof_fold (-1 for val), slice_id_<view> per extra view
        extra = [key for key in m if key == "oof_fold" or key.startswith("slice_id_")]
        columns = ["id", "split", "class_index", "slice_id", *extra]
        rows = zip(*(m.get(key, []) for key in columns), strict=True)
        tmp = out / "members.csv.tmp"
        with tmp.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(columns)
            w.writerows(rows)
        os.replace(tmp, out / "members.csv")
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> Diagnosis:
        path = Path(out_dir) / "diagnosis.json"
        if not path.is_file():
            raise RunDirError(f"{path}: no diagnosis here (run the diagnose stage first)")
        d = json.loads(path.read_text())
        if d.pop("schema", None) != SCHEMA:
            raise RunDirError(f"{path}: diagnosis schema is not {SCHEMA}")
        d["per_class"] = [ClassReport(**c) for c in d["per_class"]]
        d["slices"] = [SliceReport(**s) for s in d["slices"]]
        d["budget"] = [Allocation(**a) for a in d["budget"]]
        members: dict[str, list] = {"id": [], "split": [], "class_index": [], "slice_id": []}
        mpath = Path(out_dir) / "members.csv"
        if mpath.is_file():
            with mpath.open(newline="") as fh:
                reader = csv.DictReader(fh)
                for key in reader.fieldnames or []:
                    if key == "oof_fold" or key.startswith("slice_id_"):
                        members[key] = []
                for row in reader:
                    for key in members:
                        members[key].append(row[key])
        d["members"] = {key: np.array(values, dtype=np.int64 if key in ("class_index", "oof_fold") else object)
                        for key, values in members.items()}
        return cls(**d)


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x):
        return asdict(x)
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"cannot write {type(x).__name__} to diagnosis.json")


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_csv(path: Path, rows: list[dict], kind: type) -> None:
    names = [f.name for f in dataclasses.fields(kind)]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=names)
        w.writeheader()
        for r in rows:
            w.writerow({k: ";".join(map(str, v)) if isinstance(v, list) and not _is_ci(k) else v for k, v in r.items()})
    os.replace(tmp, path)


def _is_ci(key: str) -> bool:
    return key.endswith("_ci")


# --------------------------------------------------------------------------- inputs


def _check_inputs(classes, val_labels, val_probs, val_embeddings, val_ids, train_labels, train_embeddings,
                  train_ids) -> tuple[np.ndarray, ...]:
    """The one place input arrays are checked; returns them as arrays of the expected dtypes."""
    k = len(classes)
    if k < 2:
        raise DataError(f"classes: need at least 2 classes, got {list(classes)}")
    vl = np.asarray(val_labels)
    tl = np.asarray(train_labels)
    vp = np.asarray(val_probs, dtype=np.float64)
    ve = np.asarray(val_embeddings)
    te = np.asarray(train_embeddings)
    vid = np.asarray(val_ids, dtype=object)
    tid = np.asarray(train_ids, dtype=object)
    for name, lab in (("val_labels", vl), ("train_labels", tl)):
        if lab.ndim != 1 or (lab.size and not np.issubdtype(lab.dtype, np.integer)):
            raise DataError(f"{name}: expected a 1-D array of int class indices, got shape {lab.shape} {lab.dtype}")
        if lab.size and (lab.min() < 0 or lab.max() >= k):
            raise DataError(f"{name}: class indices must be in 0..{k - 1}, got {lab.min()}..{lab.max()}")
    if vl.size == 0:
        raise DataError("val_labels: the val split is empty; diagnosis needs real val images")
    n, m = vl.size, tl.size
    if vp.shape != (n, k):
        raise DataError(f"val_probs: expected shape ({n}, {k}) (val images × classes), got {vp.shape}")
    if not np.isfinite(vp).all() or (vp < -1e-6).any() or np.abs(vp.sum(1) - 1).max() > 1e-3:
        raise DataError("val_probs: rows must be probabilities (finite, >= 0, summing to 1); pass softmax, not logits")
    if ve.ndim != 2 or ve.shape[0] != n:
        raise DataError(f"val_embeddings: expected shape ({n}, D), got {ve.shape}")
    if te.ndim != 2 or te.shape[0] != m or (m and te.shape[1] != ve.shape[1]):
        raise DataError(f"train_embeddings: expected shape ({m}, {ve.shape[1]}), got {te.shape}")
    for name, e in (("val_embeddings", ve), ("train_embeddings", te)):
        if e.size and not np.isfinite(e[:: max(1, e.shape[0] // 10_000)]).all():
            raise DataError(f"{name}: contains NaN or infinite values")
    if vid.shape != (n,) or tid.shape != (m,):
        raise DataError(f"val_ids/train_ids: expected {n} and {m} ids, got {vid.shape} and {tid.shape}")
    if len(set(vid.tolist()) | set(tid.tolist())) != n + m:
        raise DataError("val_ids/train_ids: ids must be unique across both splits")
    return vl.astype(np.int64), vp, ve, vid, tl.astype(np.int64), te, tid


# --------------------------------------------------------------------------- metrics


def _interval(samples: np.ndarray, confidence: float) -> list[float]:
    s = samples[np.isfinite(samples)]
    if s.size == 0:
        return [0.0, 1.0]
    lo, hi = np.percentile(s, [50 * (1 - confidence), 50 * (1 + confidence)])
    return [float(lo), float(hi)]


def class_metrics(cfg: DiagnoseConfig, classes: list[str], labels: np.ndarray, probs: np.ndarray,
                  train_labels: np.ndarray, seed: int) -> tuple[dict, list[ClassReport], np.ndarray, list[dict]]:
    """Overall metrics with CIs, per-class reports, the confusion matrix and the most confused pairs."""
    k = len(classes)
    preds = probs.argmax(1)
    cm = confusion_matrix(labels, preds, labels=list(range(k)))
    point = per_class_scores(cm)
    samples = confusion_metric_samples(bootstrap_confusions(cm, cfg.n_bootstrap, seed))
    full = confusion_metric_samples(cm[None])
    overall = {name: {"value": float(full[name][0]), "ci": _interval(samples[name], cfg.confidence)}
               for name in ("accuracy", "balanced_accuracy", "macro_f1")}
    overall["ece"] = expected_calibration_error(probs, labels)
    margins = _margins(probs, labels)
    n_train = np.bincount(train_labels, minlength=k)
    err = 1 - point["recall"]
    reports = []
    for c in range(k):
        tp, sup, pred_n = int(cm[c, c]), int(cm[c].sum()), int(cm[:, c].sum())
        row = cm[c].copy()
        row[c] = 0
        top = [[classes[j], int(row[j])] for j in np.argsort(-row, kind="stable")[:3] if row[j] > 0]
        reports.append(ClassReport(
            class_index=c, class_name=classes[c], support=sup, n_train=int(n_train[c]),
            train_share=float(n_train[c] / max(1, n_train.sum())),
            recall=float(point["recall"][c]), recall_ci=list(wilson_interval(tp, sup, cfg.confidence)),
            precision=float(point["precision"][c]), precision_ci=list(wilson_interval(tp, pred_n, cfg.confidence)),
            f1=float(point["f1"][c]), f1_ci=_interval(samples["f1"][:, c], cfg.confidence),
            error_rate=float(err[c]) if sup else 0.0,
            mean_margin=float(margins[labels == c].mean()) if sup else None,
            weak=False, confused_with=top))
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:N_PAIRS]
    pairs = [{"true": classes[i], "predicted": classes[j], "count": int(off[i, j]),
              "rate": float(off[i, j] / max(1, cm[i].sum()))}
             for i, j in zip(*np.unravel_index(flat, off.shape), strict=True) if off[i, j] > 0]
    return overall, reports, cm, pairs


def _margins(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Probability of the true class minus the best other class (negative when misclassified)."""
    true = probs[np.arange(labels.size), labels]
    other = probs.copy()
    other[np.arange(labels.size), labels] = -np.inf
    return true - other.max(1)


# --------------------------------------------------------------------------- entry point


def diagnose(cfg: DiagnoseConfig, *, classes: list[str], val: LabelledImages, val_probs: np.ndarray,
             val_embeddings: np.ndarray, train: LabelledImages, train_embeddings: np.ndarray, seed: int,
             mode: str = "exemplar", strength: float = 0.5, train_probs: np.ndarray | None = None,
             train_folds: np.ndarray | None = None, metadata: dict[str, np.ndarray] | None = None,
             extra_views: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Diagnosis:
    """Metrics with CIs, weak slices and the synthesis budget from `val` predictions and real embeddings.

    Of the `val` and `train` splits only the labels and ids are read; `*_probs` and `*_embeddings`
    are the model's outputs on them, row for row. `mode` and `strength` are recorded in the budget.

    Optional: `train_probs`, out-of-fold predicted probabilities of the train images (`vision_si.oof`),
    makes the slices judge train images as well as val (`train_folds`, each train image's fold, is
    recorded in `members["oof_fold"]`); the metrics, confusion matrix and class errors stay val-only.
    `metadata` maps a column name to one value per val-then-train image (e.g. ELPV's cell type): each
    slice is described by the value it is most enriched for. `extra_views` maps a view name (e.g.
    `"ssl"`) to (val, train) embeddings of another encoder, clustered and tested like the classifier's.
    """
    t0 = time.perf_counter()
    classes = list(classes)
    vl, vp, ve, vid, tl, te, tid = _check_inputs(classes, val.labels, val_probs, val_embeddings, val.ids,
                                                 train.labels, train_embeddings, train.ids)
    tp = _check_train_probs(train_probs, tl.size, len(classes))
    views = _check_views(extra_views, vl.size, tl.size)
    meta = check_metadata(metadata, vl.size + tl.size)
    timings = {}
    overall, reports, cm, pairs = class_metrics(cfg, classes, vl, vp, tl, seed)
    timings["metrics"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    preds = vp.argmax(1)
    slices, val_slice, train_slice, class_exemplars, per_view = find_slices(
        cfg, classes=classes, val_labels=vl, val_preds=preds, val_margins=_margins(vp, vl), val_embeddings=ve,
        val_ids=vid, train_labels=tl, train_embeddings=te, train_ids=tid, seed=seed,
        train_preds=None if tp is None else tp.argmax(1), train_margins=None if tp is None else _margins(tp, tl),
        extra_views=views)
    members = {"id": np.concatenate([vid, tid]),
               "split": np.array(["val"] * vl.size + ["train"] * tl.size, dtype=object),
               "class_index": np.concatenate([vl, tl]),
               "slice_id": np.concatenate([val_slice, train_slice])}
    if train_folds is not None:
        folds = np.asarray(train_folds, dtype=np.int64)
        if folds.shape != (tl.size,):
            raise DataError(f"train_folds: expected {tl.size} fold indices, got shape {folds.shape}")
        members["oof_fold"] = np.concatenate([np.full(vl.size, -1, np.int64), folds])
    members.update({f"slice_id_{name}": ids for name, ids in per_view.items()})
    describe_slices(slices, class_index=members["class_index"],
                    members={CLASSIFIER_VIEW: members["slice_id"], **per_view}, metadata=meta)
    timings["slices"] = time.perf_counter() - t1
    weak = set(weak_classes_of(cm.sum(1) - np.diag(cm), cm.sum(1), slices))
    for r in reports:
        r.weak = r.class_index in weak
    t2 = time.perf_counter()
    budget, notes = allocate_budget(
        cfg, classes=classes, class_errors=cm.sum(1) - np.diag(cm), class_val=cm.sum(1),
        class_train=np.bincount(tl, minlength=len(classes)), slices=slices, class_exemplars=class_exemplars,
        mode=mode, strength=strength)
    timings["budget"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0
    return Diagnosis(classes=classes, seed=seed, config=asdict(cfg), n_val=int(vl.size), n_train=int(tl.size),
                     overall=overall, per_class=reports, confusion=cm.tolist(), confused_pairs=pairs,
                     slices=slices, budget=budget, notes=notes, timings_s=timings, members=members,
                     judged="val" if tp is None else "val+oof-train", views=[CLASSIFIER_VIEW, *per_view])


def _check_train_probs(train_probs: np.ndarray | None, m: int, k: int) -> np.ndarray | None:
    if train_probs is None:
        return None
    tp = np.asarray(train_probs, dtype=np.float64)
    if tp.shape != (m, k):
        raise DataError(f"train_probs: expected shape ({m}, {k}) (train images × classes), got {tp.shape}")
    if tp.size and (not np.isfinite(tp).all() or (tp < -1e-6).any() or np.abs(tp.sum(1) - 1).max() > 1e-3):
        raise DataError("train_probs: rows must be probabilities (finite, >= 0, summing to 1); pass softmax, not logits")
    return tp


def _check_views(extra_views: dict | None, n: int, m: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for name, pair in (extra_views or {}).items():
        if not isinstance(name, str) or not name.isidentifier() or name == CLASSIFIER_VIEW:
            raise DataError(f"extra_views: a view name must be a plain word other than {CLASSIFIER_VIEW!r}, "
                            f"got {name!r}")
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise DataError(f"extra_views[{name!r}]: expected (val_embeddings, train_embeddings)")
        ve, te = np.asarray(pair[0]), np.asarray(pair[1])
        if ve.ndim != 2 or ve.shape[0] != n or te.ndim != 2 or te.shape != (m, ve.shape[1]):
            raise DataError(f"extra_views[{name!r}]: expected shapes ({n}, D) and ({m}, D), got {ve.shape} and "
                            f"{te.shape}")
        if not (np.isfinite(ve).all() and np.isfinite(te).all()):
            raise DataError(f"extra_views[{name!r}]: contains NaN or infinite values")
        out[name] = (ve, te)
    return out
