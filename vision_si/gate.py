"""The gate: synthetic images join training only if a model trained with them is better on real `val`.

`run_gate` trains `gate.seeds` candidate models with the recipe, step budget and seeds of the
baseline (seed + k for the k-th, as the baseline side) on real train + the accepted pool + this
round's filtered candidates, predicts `val`, and calls `decide`.

`decide` compares the two sides on the same `val` images with a paired bootstrap (both sides'
metric on each resample of images; with several seeds per side, the mean over seeds on each
resample). It accepts only if

1. the lower end of the interval of the improvement `metric(candidate) - metric(baseline)` is
   above `gate.min_delta` and above the noise floor (`gate.noise_floor`, 0 by default), and
2. no class's recall (mean over seeds) drops by more than its allowed drop:
   `max(gate.tolerance, gate.tolerance_min_images / support)`. A class with 16 val images cannot
   measure a recall change finer than 1/16 = 0.0625; a tolerance below that would call a single
   flipped image a regression, so the allowed drop is never finer than `tolerance_min_images`
   images of the class (1 by default; 0 restores the plain tolerance).

A bootstrap over images does not see training noise: two models from different seeds differ even
on the same data. Both sides therefore train from the same seeds. With `gate.seeds >= 2` and
`gate.bootstrap: seeds_and_images` (the default) each resample also draws the seed pairs with
replacement, so the interval widens when the seeds disagree; `gate.noise_floor: auto` further
requires the lower bound to clear the between-seed standard deviation of the per-seed deltas.
A single seed gives no estimate of training noise at all: `benchmarks/gate_copies.py` measures
how often each rule calls a pool of exact copies of real training images a gain (with one seed,
about 1 time in 12 on digits) and how often it accepts a pool of extra real images.

With `gate.enabled: false` (ablations only) every pool is accepted, and the decision records that
the gate was off and what it would have decided.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vision_si.classifier import predict, train_classifier
from vision_si.config import ClassifierConfig, GateConfig
from vision_si.errors import DataError, InputError
from vision_si.metrics import bootstrap_interval, classification_metrics, paired_bootstrap

BOOTSTRAP_METHOD = "paired percentile bootstrap over val images; metric averaged over seeds on each resample"
BOOTSTRAP_METHODS = {
    "images": BOOTSTRAP_METHOD,
    "seeds_and_images": "paired percentile bootstrap over seed pairs and val images (crossed, both drawn with "
                        "replacement on each resample); metric averaged over the drawn seeds",
}


@dataclass
class GateDecision:
    accepted: bool
    reason: str
    reason_code: str  # gain | no_confident_gain | class_regression | no_candidates | gate_off
    metric: str
    before: dict[str, Any]  # {"value": x, "ci": [lo, hi]} (baseline)
    after: dict[str, Any]  # same, candidate
    delta: dict[str, Any]  # {"value": x, "ci": [lo, hi], "p_not_better": p}
    min_delta: float
    tolerance: float
    per_class: dict[str, dict[str, float | int | None]]  # class → before, after, delta (recall), support, allowed
    regressions: list[str]  # classes whose recall dropped by more than `tolerance`
    bootstrap: dict[str, Any]
    seeds: list[int]
    n_val: int
    gate_enabled: bool = True
    would_accept: bool | None = None  # the decision of the gate itself (differs from `accepted` when off)
    weak_classes: list[int] | None = None
    training: dict[str, Any] = field(default_factory=dict)  # what run_gate trained, counts and seconds
    noise_floor: float = 0.0  # the floor the lower bound had to clear besides min_delta (resolved from "auto")
    tolerance_min_images: int = 0  # the allowed drop was never below this many val images of the class

    @property
    def decision(self) -> str:
        if self.reason_code == "no_candidates":
            return "skipped"
        return "accepted" if self.accepted else "rejected"

    def summary(self) -> dict[str, Any]:
        """The gate's entry in summary.json."""
        return {"decision": self.decision, "reason": self.reason, "metric": self.metric, "before": self.before,
                "after": self.after, "delta": self.delta, "gate_enabled": self.gate_enabled}

    def save(self, out_dir: str | Path) -> None:
        from vision_si.rundir import atomic_write_json

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "decision.json", {"decision": self.decision, **dataclasses.asdict(self)})

    @classmethod
    def load(cls, out_dir: str | Path) -> GateDecision:
        from vision_si.rundir import read_json

        data = read_json(Path(out_dir) / "decision.json")
        data.pop("decision", None)
        return cls(**data)


def _as_rows(name: str, preds: Any, n: int, k: int) -> np.ndarray:
    p = np.asarray(preds)
    if p.ndim == 1:
        p = p[None, :]
    if p.ndim != 2 or p.shape[1] != n:
        raise DataError(f"{name}: expected {n} predicted class indices (or seeds × {n}), got shape {p.shape}")
    if not np.issubdtype(p.dtype, np.integer):
        raise DataError(f"{name}: expected integer class indices, got {p.dtype} (pass probs.argmax(1))")
    if p.size and (p.min() < 0 or p.max() >= k):
        raise DataError(f"{name}: class indices must be in 0..{k - 1}, got {p.min()}..{p.max()}")
    return p.astype(np.int64)


def _mean_recall(labels: np.ndarray, rows: np.ndarray, classes: list[str]) -> np.ndarray:
    return np.mean([[m["recall"] for m in classification_metrics(labels, p, classes)["per_class"].values()]
                    for p in rows], axis=0)


def decide(cfg: GateConfig, *, val_labels: np.ndarray, baseline_preds: np.ndarray, candidate_preds: np.ndarray,
           classes: Sequence[str], weak_classes: Sequence[int] | None = None, seed: int = 0,
           model_seeds: Sequence[int] | None = None) -> GateDecision:
    """Paired comparison of baseline and candidate predictions on real `val` (N, or seeds × N, class indices)."""
    classes = list(classes)
    k = len(classes)
    labels = np.asarray(val_labels, np.int64)
    if labels.ndim != 1 or not labels.size:
        raise DataError(f"val_labels: expected a non-empty 1-D array of class indices, got shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= k:
        raise DataError(f"val_labels: class indices must be in 0..{k - 1}, got {labels.min()}..{labels.max()}")
    base = _as_rows("baseline_preds", baseline_preds, labels.size, k)
    cand = _as_rows("candidate_preds", candidate_preds, labels.size, k)
    if base.shape[0] != cand.shape[0]:
        raise DataError(f"baseline_preds has {base.shape[0]} seed(s), candidate_preds {cand.shape[0]}: the "
                        "comparison is paired, both sides need the same seeds")
    weak = sorted({int(c) for c in weak_classes}) if weak_classes else None
    if cfg.metric == "weak_class_recall" and not weak:
        raise InputError("gate.metric: 'weak_class_recall' needs weak classes (the diagnosis found none); "
                         "use macro_f1 or balanced_accuracy")
    if weak and (min(weak) < 0 or max(weak) >= k):
        raise DataError(f"weak_classes: class indices must be in 0..{k - 1}, got {weak}")

    n_seeds = base.shape[0]
    method = cfg.bootstrap if n_seeds > 1 else "images"  # with one seed both are the same
    boot = dict(n_bootstrap=cfg.n_bootstrap, confidence=cfg.confidence, seed=seed, weak_classes=weak,
                resample_seeds=method == "seeds_and_images")
    pb = paired_bootstrap(labels, base, cand, k, cfg.metric, **boot)
    floor, floor_note = _noise_floor(cfg.noise_floor, pb["seed_sd"])
    ci_before = bootstrap_interval(labels, base, k, cfg.metric, **boot)
    ci_after = bootstrap_interval(labels, cand, k, cfg.metric, **boot)

    support = np.bincount(labels, minlength=k)
    r_before, r_after = _mean_recall(labels, base, classes), _mean_recall(labels, cand, classes)
    per_class: dict[str, dict[str, float | int | None]] = {}
    regressions = []
    for c, name in enumerate(classes):
        if support[c] == 0:  # recall undefined: no val image of this class
            per_class[name] = {"before": None, "after": None, "delta": None, "support": 0, "allowed": None}
            continue
        d = float(r_after[c] - r_before[c])
        allowed = max(cfg.tolerance, cfg.tolerance_min_images / support[c])
        per_class[name] = {"before": float(r_before[c]), "after": float(r_after[c]), "delta": d,
                           "support": int(support[c]), "allowed": float(allowed)}
        if d < -allowed - 1e-12:
            regressions.append(name)

    threshold = max(cfg.min_delta, floor)
    gain = pb["lower"] > threshold
    interval = f"{cfg.metric} {pb['delta']:+.4f} [{pb['lower']:+.4f}, {pb['upper']:+.4f}]"
    if n_seeds > 1:
        interval += f" over {n_seeds} seeds (per seed {', '.join(f'{v:+.4f}' for v in pb['per_seed_delta'])})"
    bar = f"min_delta {cfg.min_delta:g}" + (f" and the noise floor {floor:.4f} ({floor_note})" if floor > 0 else "")
    reasons = []
    if not gain:
        reasons.append(f"the lower bound of the {cfg.metric} improvement ({pb['lower']:+.4f}) is not above "
                       f"{bar}: {interval}")
    tol_rule = f"tolerance {cfg.tolerance:g}" + (f" or {cfg.tolerance_min_images} val image(s) of the class"
                                                 if cfg.tolerance_min_images else "")
    if regressions:
        worst = min(regressions, key=lambda n: per_class[n]["delta"])
        reasons.append(f"recall of {', '.join(repr(n) for n in regressions)} drops by more than {tol_rule} "
                       f"(worst {worst!r}: {per_class[worst]['delta']:+.4f}, allowed "
                       f"-{per_class[worst]['allowed']:.4f})")
    would_accept = gain and not regressions
    if would_accept:
        code = "gain"
        reason = f"{interval} > {threshold:.4g} ({bar}) and no class's recall drops by more than {tol_rule}"
    else:
        code = "no_confident_gain" if not gain else "class_regression"
        reason = "; ".join(reasons)
    if floor_note and floor == 0:  # "auto" with one seed: say that no floor could be estimated
        reason += f"; {floor_note}"
    if not cfg.enabled:
        code = "gate_off"
        reason = f"gate off (ablation): accepted without proof; the gate would have {'accepted' if would_accept else 'rejected'} ({reason})"

    return GateDecision(
        accepted=bool(would_accept or not cfg.enabled), reason=reason, reason_code=code, metric=cfg.metric,
        before={"value": pb["a"], "ci": list(ci_before)}, after={"value": pb["b"], "ci": list(ci_after)},
        delta={"value": pb["delta"], "ci": [pb["lower"], pb["upper"]], "p_not_better": pb["p_not_better"],
               "per_seed": pb["per_seed_delta"], "seed_sd": pb["seed_sd"]},
        min_delta=cfg.min_delta, tolerance=cfg.tolerance, per_class=per_class, regressions=regressions,
        bootstrap={"n_bootstrap": cfg.n_bootstrap, "confidence": cfg.confidence, "seed": seed,
                   "method": BOOTSTRAP_METHODS[method]},
        seeds=[int(s) for s in model_seeds] if model_seeds is not None else list(range(n_seeds)),
        n_val=int(labels.size), gate_enabled=cfg.enabled, would_accept=bool(would_accept), weak_classes=weak,
        noise_floor=float(floor), tolerance_min_images=int(cfg.tolerance_min_images))


def _noise_floor(setting: Any, seed_sd: float | None) -> tuple[float, str]:
    """The floor the lower bound must clear, and a note on where it came from."""
    if setting == "auto":
        if seed_sd is None:
            return 0.0, ("noise_floor auto: one seed gives no estimate of training noise (a single-seed gate "
                         "accepted exact copies in about 8 % of trials; use gate.seeds >= 3)")
        return float(seed_sd), "auto: between-seed sd of the per-seed deltas"
    return float(setting), "gate.noise_floor" if setting else ""


# --------------------------------------------------------------------------- retrain and compare


def _augment_for(augment: Any, seed: int) -> Any:
    """`augment` is a transform used as is (or None), or a function of the seed that builds one."""
    if augment is None or hasattr(augment, "set_random_seed"):
        return augment
    if callable(augment):
        try:
            required = [p for p in inspect.signature(augment).parameters.values()
                        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            required = []
        if len(required) == 1:
            return augment(seed)
    return augment  # a per-image callable fn(image_hwc, seed): the training loader seeds it per draw


def _stack(name: str, parts: list[tuple[np.ndarray | None, np.ndarray | None, Sequence[str] | None]]):
    images, labels, ids = [], [], []
    for x, y, i in parts:
        if x is None or not len(x):
            continue
        y = np.asarray(y, np.int64)
        if len(y) != len(x) or (i is not None and len(i) != len(x)):
            raise DataError(f"{name}: {len(x)} images, {len(y)} labels and {len(i or [])} ids do not match")
        images.append(np.asarray(x, np.float32))
        labels.append(y)
        ids += [str(v) for v in i] if i is not None else [f"extra:{len(ids) + k}" for k in range(len(x))]
    if not images:
        return None, None, None
    return np.concatenate(images), np.concatenate(labels), ids


def run_gate(cfg: GateConfig, clf_cfg: ClassifierConfig, *, train_images: np.ndarray, train_labels: np.ndarray,
             pool_images: np.ndarray | None, pool_labels: np.ndarray | None, pool_ids: Sequence[str] | None,
             candidate_images: np.ndarray, candidate_labels: np.ndarray, candidate_ids: Sequence[str],
             val_images: np.ndarray, val_labels: np.ndarray, classes: Sequence[str], seed: int,
             out_dir: str | Path, baseline_preds: np.ndarray, augment: Any = None,
             weak_classes: Sequence[int] | None = None, progress: bool = True) -> GateDecision:
    """Train `cfg.seeds` candidate models (seed + k) on real train + pool + candidates and `decide`.

    `baseline_preds` (seeds × N val, class indices) come from the current models trained with the
    same seeds. The k-th candidate model is written to `out_dir/candidate-k/`; after an interruption
    a finished folder is loaded and a partial one resumed (train_classifier's contract). With no candidate
    there is nothing to add: nothing is trained and the round is `skipped`.
    """

    out = Path(out_dir)
    seeds = [seed + k for k in range(cfg.seeds)]
    base = np.atleast_2d(np.asarray(baseline_preds))
    if base.shape[0] != len(seeds):
        raise DataError(f"baseline_preds has {base.shape[0]} seed(s) but gate.seeds is {cfg.seeds}: "
                        "both sides train with the same seeds")
    if not len(candidate_ids):
        d = decide(cfg, val_labels=val_labels, baseline_preds=base, candidate_preds=base, classes=classes,
                   weak_classes=weak_classes, seed=seed, model_seeds=seeds)
        d.accepted, d.would_accept, d.reason_code = False, False, "no_candidates"
        d.reason = "no candidate passed the filter: nothing to add, no model trained"
        return d

    extra_x, extra_y, extra_ids = _stack("pool + candidates", [(pool_images, pool_labels, pool_ids),
                                                                (candidate_images, candidate_labels, candidate_ids)])
    start = time.time()
    preds, dirs = [], []
    for k, s in enumerate(seeds):
        model_dir = out / f"candidate-{k}"
        # A finished folder with the same inputs is loaded, a partial one resumed (train_classifier's contract).
        clf = train_classifier(clf_cfg, train_images, train_labels, classes=list(classes), seed=s,
                               out_dir=model_dir, val_images=val_images, val_labels=val_labels,
                               extra_images=extra_x, extra_labels=extra_y, extra_ids=extra_ids,
                               augment=_augment_for(augment, s), progress=progress)
        preds.append(predict(clf, val_images, batch_size=clf_cfg.predict_batch_size).probs.argmax(1))
        dirs.append(model_dir.name)
    d = decide(cfg, val_labels=val_labels, baseline_preds=base, candidate_preds=np.stack(preds), classes=classes,
               weak_classes=weak_classes, seed=seed, model_seeds=seeds)
    d.training = {"n_train": int(len(train_labels)), "n_pool": int(len(pool_ids or [])),
                  "n_candidates": int(len(candidate_ids)), "steps": clf_cfg.steps,
                  "synthetic_share": clf_cfg.synthetic_share, "models": dirs, "seconds": time.time() - start}
    d.save(out)
    return d

