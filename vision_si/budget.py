"""The synthesis budget: how many images to make for each (class, slice), and from which exemplars.

Deficit score. For class `c` with val error rate `err_c` and share `share_c` of the real training
images, the class deficit is

    D_c = err_c × (1 − share_c)

— errors matter more where real data is scarce. A class is *weak* when it holds a weak slice, or
when `err_c > 0` and `err_c` is at least the mean per-class error rate (1 − balanced accuracy).
Each weak class's deficit is split over its units in proportion to the val errors each accounts
for: one unit per weak slice (`e_s / E_c` of `D_c`), and a class-level unit (`slice_id="class"`)
for the errors outside its weak slices. So a unit's score is `(e_u / n_val_c) × (1 − share_c)`:
the share of the class's val images it gets wrong, weighted by scarcity. A weak slice counts its
errors over its judged images (val, plus train when judged out of fold: `e_s / n_judged_c`) and, when
its stability was measured, is weighed by it (`× stability`, so a slice that re-clustering does not
find again gets little). The class-level unit subtracts only the classifier view's slices' val
errors: a slice of another view (`ssl`) may hold the same errors.

Allocation. `budget_total` images are shared in proportion to the scores, with every unit at
least `budget_floor` and at most `floor(budget_cap_fraction × total)` (shares `clip(λ·score, floor, cap)`
with λ found by bisection), then rounded to integers by largest remainder so
the counts sum exactly to the total. When the caps leave images unplaced, class-level units of
the other classes join (highest deficit first, then scarcest); when even every class at the cap
cannot hold the total, the cap is raised to the smallest that can, and a note says so. When the
floors cannot all be met, the lowest-scored units are dropped. Every such adjustment is recorded
in the returned notes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from vision_si.config import DiagnoseConfig
from vision_si.errors import ConfigError
from vision_si.slices import CLASSIFIER_VIEW, SliceReport

CLASS_SLICE = "class"


@dataclass
class Allocation:
    """One budget line. The first seven fields are those of `GenerationRequest`; the loop turns a budget
    into requests in one place (`vision_si.stages.generation_requests`), so the diagnosis never
    imports the generators."""

    class_index: int
    class_name: str
    slice_id: str
    count: int
    exemplar_ids: list[str] = field(default_factory=list)
    mode: str = "exemplar"
    strength: float = 0.5
    deficit: float = 0.0


def water_fill(weights: np.ndarray, total: int, floor: float, cap: float) -> np.ndarray:
    """Shares `clip(λ·w, floor, cap)` with λ set so they sum to `total`; needs n·floor ≤ total ≤ n·cap.

    The sum grows monotonically with λ, so bisection finds it. Zero weights get a vanishing weight:
    such units stay at the floor unless the caps of all others force images onto them.
    """
    w = np.asarray(weights, dtype=float)
    w = np.ones_like(w) if w.size and w.max() <= 0 else w
    if w.size:
        # relative weights, none below 1e-250, so λ·w reaches the caps before λ reaches the 1e300 limit
        # below (tiny scores used to leave the total unplaced); a zero weight stays below every positive one
        w = w / w.max()
        w = np.where(w > 0, np.maximum(w, 1e-250), 1e-259)

    def placed(lam: float) -> float:
        return float(np.clip(lam * w, floor, cap).sum())

    lo, hi = 0.0, 1.0
    while placed(hi) < total and hi < 1e300:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if placed(mid) < total else (lo, mid)
    return np.clip(hi * w, floor, cap)


def largest_remainder(shares: np.ndarray, total: int, cap: int, order: np.ndarray) -> np.ndarray:
    """Integer counts summing to `total`: floors of the shares, then +1 by largest fractional part."""
    counts = np.floor(shares + 1e-9).astype(int)
    frac = shares - counts
    # stable tie-break by `order` (higher score first), so equal remainders resolve deterministically
    rank = sorted(range(shares.size), key=lambda i: (-round(frac[i], 9), order[i]))
    left = total - int(counts.sum())
    for i in rank:
        if left <= 0:
            break
        if counts[i] < cap:
            counts[i] += 1
            left -= 1
    return counts


def slice_score(s: SliceReport, class_val: int) -> float:
    """A weak slice's share of its class's judged images that it gets wrong, times its stability when measured."""
    share = s.n_judged_errors / s.class_n_judged if s.class_n_judged else s.n_val_errors / max(class_val, 1)
    return share * (1.0 if s.stability is None else s.stability)


def weak_classes_of(class_errors: np.ndarray, class_val: np.ndarray, slices: list[SliceReport]) -> list[int]:
    """Classes holding a weak slice, or with val errors at or above the mean per-class error rate."""
    present = class_val > 0
    err = np.where(present, class_errors / np.maximum(class_val, 1), 0.0)
    mean_err = float(err[present].mean()) if present.any() else 0.0
    return sorted({s.class_index for s in slices if s.weak}
                  | {int(k) for k in np.flatnonzero(present & (err > 0) & (err >= mean_err))})


def allocate_budget(cfg: DiagnoseConfig, *, classes: list[str], class_errors: np.ndarray, class_val: np.ndarray,
                    class_train: np.ndarray, slices: list[SliceReport], class_exemplars: dict[int, list[str]],
                    mode: str, strength: float) -> tuple[list[Allocation], list[str]]:
    """The budget (one `Allocation` per unit with a positive count) and notes on any adjustment."""
    notes: list[str] = []
    total = cfg.budget_total
    if total == 0:
        return [], notes
    cap = max(1, math.floor(cfg.budget_cap_fraction * total))
    floor = cfg.budget_floor
    if floor > cap:
        raise ConfigError(f"diagnose.budget_floor={floor} is above the cap of one allocation "
                          f"(diagnose.budget_cap_fraction={cfg.budget_cap_fraction} × budget_total={total} "
                          f"= {cap}); lower the floor or raise the cap")
    n_train = max(1, int(class_train.sum()))
    scarcity = 1.0 - class_train / n_train
    err = np.where(class_val > 0, class_errors / np.maximum(class_val, 1), 0.0)
    weak_slices = [s for s in slices if s.weak]
    weak_classes = weak_classes_of(class_errors, class_val, slices)

    units: list[tuple[int, str, float, list[str]]] = []  # class, slice id, score, exemplars
    for k in weak_classes:
        inside = 0
        for s in (s for s in weak_slices if s.class_index == k):
            units.append((k, s.slice_id, slice_score(s, class_val[k]) * scarcity[k], s.exemplar_ids))
            if s.view == CLASSIFIER_VIEW:  # another view's slice may hold the same errors: not subtracted twice
                inside += s.n_val_errors
        rest = class_errors[k] - inside
        if rest > 0:
            units.append((k, CLASS_SLICE, rest / class_val[k] * scarcity[k], class_exemplars.get(k, [])))
    if not units:
        notes.append("no class has val errors: the budget is spread over all classes by training scarcity")
    # caps may leave images unplaced: bring in the other classes, highest deficit then scarcest first
    others = sorted((k for k in range(len(classes)) if k not in weak_classes),
                    key=lambda k: (-err[k] * scarcity[k], -scarcity[k], k))
    while len(units) * cap < total and others:
        k = others.pop(0)
        score = err[k] * scarcity[k] if units else scarcity[k]
        units.append((k, CLASS_SLICE, float(score), class_exemplars.get(k, [])))
        if score == 0:
            notes.append(f"class {classes[k]!r} joined the budget only because the cap left images unplaced")
    if len(units) * cap < total:
        cap = math.ceil(total / len(units))
        notes.append(f"budget_cap_fraction={cfg.budget_cap_fraction} cannot place {total} images over "
                     f"{len(units)} allocations; cap raised to {cap}")
    scores = np.array([u[2] for u in units], dtype=float)
    keep = np.argsort(-scores, kind="stable")
    if floor and floor * len(units) > total:
        n_keep = max(math.ceil(total / cap), total // floor)
        if n_keep * floor > total:
            notes.append(f"budget_floor={floor} cannot hold for {n_keep} allocations; lowered to {total // n_keep}")
            floor = total // n_keep
        dropped = [f"{classes[units[i][0]]}/{units[i][1]}" for i in keep[n_keep:]]
        notes.append(f"budget_floor={floor} leaves room for {n_keep} allocations; dropped {', '.join(dropped)}")
        keep = keep[:n_keep]
    keep = np.sort(keep)
    units = [units[i] for i in keep]
    scores = scores[keep]
    shares = water_fill(scores, total, float(floor), float(cap))
    order = np.argsort(np.argsort(-scores, kind="stable"), kind="stable")
    counts = largest_remainder(shares, total, cap, order)

    budget = []
    for (k, sid, score, exemplars), n in zip(units, counts, strict=True):
        if n <= 0:
            continue
        unit_mode = mode
        if mode == "exemplar" and not exemplars:
            unit_mode = "class"
            notes.append(f"{classes[k]}/{sid}: no training exemplars, so class-conditional mode")
        budget.append(Allocation(class_index=int(k), class_name=classes[k], slice_id=sid, count=int(n),
                                 exemplar_ids=list(exemplars), mode=unit_mode, strength=float(strength),
                                 deficit=float(score)))
    budget.sort(key=lambda a: (a.class_index, a.slice_id != CLASS_SLICE, a.slice_id))
    return budget, notes
