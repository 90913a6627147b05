"""The gate's decision: two paired sides, judged on real images that chose nothing, by a rule fixed in advance.

`decide` takes, for each paired seed, both sides' predicted log-probabilities on the *selection*
images (they fit the calibration) and on the *judging* images (they decide), and returns a
`GateDecision`. Two questions are answered separately and both are recorded:

- **does the pool harm?** non-inferiority: the lower end of the interval of the improvement is
  above `-gate.margin`;
- **does it help?** superiority: the lower end is above `gate.min_delta`.

`gate.admit` says which of the two admits a pool (superiority by default: a pool that merely does no
harm, such as copies of training images, is not worth its risk). The primary metric (`gate.metric`,
by default the macro one-vs-rest AUROC) uses the whole predicted distribution. Two checks must hold
as well, on balanced decisions after the same calibration for both sides: macro-F1 is not worse
by more than `gate.f1_margin` (lower end of its interval), and no class's recall (mean over seeds)
drops by more than `max(gate.tolerance, gate.tolerance_min_images / support)`.

Seeds come in looks (`GateConfig.look_schedule`: 3, 6, 9 by default); the interval at a look uses
that look's nominal level (`statistics.sequential_levels`), and the decision says whether to stop:
accept when the admitting bound is crossed and the checks hold; reject early (futility) when the
upper end of the ordinary interval at `gate.confidence` is not above the admitting threshold (the
pool cannot be shown to pass; stopping for futility never raises the false-acceptance rate); else
continue, and at the last look whatever holds decides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vision_si.config import GateConfig
from vision_si.errors import DataError
from vision_si.gate.statistics import (
    Calibration,
    balanced_predictions,
    fit_calibration,
    metric_value,
    paired_interval,
    sequential_levels,
)

CALIBRATION_METHOD = ("temperature and class bias fitted by maximum likelihood on the selection images, per model; "
                      "argmax decisions for a balanced prior")


@dataclass
class Estimate:
    value: float
    ci: list[float] | None = None  # [lower, upper], None when no interval applies
    method: str = ""


@dataclass
class Look:
    n_seeds: int
    level: float  # nominal one-sided error spent at this look
    delta: float
    lower: float
    upper: float
    outcome: str  # accept | reject | continue


@dataclass
class GateDecision:
    accepted: bool
    reason: str
    reason_code: str  # help | no_harm | no_confident_gain | harm | check_failed | no_candidates | gate_off
    admit: str  # superiority | non_inferiority
    metric: str
    before: Estimate  # baseline side, mean over seeds, on the judging images
    after: Estimate  # candidate side
    delta: Estimate  # the paired improvement (positive: candidate better) and its interval
    superiority: bool  # lower end above min_delta: the pool helps
    non_inferiority: bool  # lower end above -margin: the pool does no harm
    harm: bool  # upper end below -margin: the pool clearly harms
    min_delta: float
    margin: float
    checks: dict[str, Any]  # macro_f1: {delta, ci, margin, passed}; recall: {passed, regressions}
    per_class: dict[str, dict[str, float | int | None]]  # class -> before, after, delta (recall), support, allowed
    regressions: list[str]
    looks: list[Look]
    seeds: list[int]
    n_judge: int
    n_select: int
    per_seed: list[float] = field(default_factory=list)
    seed_sd: float | None = None
    calibration: str = CALIBRATION_METHOD
    gate_enabled: bool = True
    would_accept: bool | None = None
    stopped_early: bool = False
    weak_classes: list[int] | None = None
    training: dict[str, Any] = field(default_factory=dict)  # what run_gate trained: mode, steps, seconds

    @property
    def decision(self) -> str:
        if self.reason_code == "no_candidates":
            return "skipped"
        return "accepted" if self.accepted else "rejected"

    def summary(self) -> dict[str, Any]:
        """The gate's entry in summary.json."""
        return {"decision": self.decision, "reason": self.reason, "admit": self.admit, "metric": self.metric,
                "before": dataclasses.asdict(self.before), "after": dataclasses.asdict(self.after),
                "delta": dataclasses.asdict(self.delta), "superiority": self.superiority,
                "non_inferiority": self.non_inferiority, "seeds": len(self.seeds), "gate_enabled": self.gate_enabled}

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
        for key in ("before", "after", "delta"):
            data[key] = Estimate(**data[key])
        data["looks"] = [Look(**v) for v in data.get("looks", [])]
        return cls(**data)


@dataclass
class SidePredictions:
    """One side's log-probabilities for each seed: S×N_select×K and S×N_judge×K."""

    select: np.ndarray
    judge: np.ndarray


def _check(name: str, side: SidePredictions, n_select: int, n_judge: int, k: int) -> None:
    for part, n in (("select", n_select), ("judge", n_judge)):
        arr = getattr(side, part)
        if arr.ndim != 3 or arr.shape[1:] != (n, k):
            raise DataError(f"{name}.{part}: expected seeds × {n} × {k} log-probabilities, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{name}.{part}: log-probabilities must be finite")


def _calibrated(side: SidePredictions, select_labels: np.ndarray) -> tuple[np.ndarray, list[Calibration]]:
    cals = [fit_calibration(s, select_labels) for s in side.select]
    return np.stack([c.apply(j) for c, j in zip(cals, side.judge, strict=True)]), cals


def _recall(labels: np.ndarray, preds: np.ndarray, k: int) -> np.ndarray:
    support = np.bincount(labels, minlength=k)
    hits = np.bincount(labels[preds == labels], minlength=k)
    return np.where(support > 0, hits / np.maximum(support, 1), np.nan)


def decide(cfg: GateConfig, *, classes: Sequence[str], select_labels: np.ndarray, judge_labels: np.ndarray,
           baseline: SidePredictions, candidate: SidePredictions, seeds: Sequence[int],
           weak_classes: Sequence[int] | None = None, seed: int = 0) -> GateDecision:
    """The decision at the look reached with the seeds given so far (module doc)."""
    classes = list(classes)
    k = len(classes)
    y_sel, y_judge = np.asarray(select_labels, np.int64), np.asarray(judge_labels, np.int64)
    if y_judge.ndim != 1 or not y_judge.size:
        raise DataError(f"judge_labels: expected a non-empty 1-D array, got shape {y_judge.shape}")
    for name, y in (("select_labels", y_sel), ("judge_labels", y_judge)):
        if y.size and (y.min() < 0 or y.max() >= k):
            raise DataError(f"{name}: class indices must be in 0..{k - 1}, got {y.min()}..{y.max()}")
    _check("baseline", baseline, y_sel.size, y_judge.size, k)
    _check("candidate", candidate, y_sel.size, y_judge.size, k)
    s = baseline.judge.shape[0]
    if candidate.judge.shape[0] != s or len(seeds) != s:
        raise DataError(f"baseline has {s} seed(s), candidate {candidate.judge.shape[0]}, seeds {len(seeds)}: the "
                        "comparison is paired, both sides need the same seeds")
    schedule = cfg.look_schedule()
    if s not in schedule:
        raise DataError(f"{s} paired seed(s) is not a look of the gate's design {schedule} "
                        "(gate.seeds_per_look, gate.max_seeds)")
    alpha = (1 - cfg.confidence) / 2
    look = schedule.index(s)
    level = sequential_levels(tuple(schedule), alpha)[look]
    last = look == len(schedule) - 1

    # the selection images' class frequencies set the balanced rule's prior (judging images are not used)
    prior = np.bincount(y_sel, minlength=k) / max(len(y_sel), 1) if y_sel.size else np.full(k, 1 / k)
    prior = np.where(prior > 0, prior, 1 / k)
    base_j, _ = _calibrated(baseline, y_sel)
    cand_j, _ = _calibrated(candidate, y_sel)
    boot = dict(n_bootstrap=cfg.n_bootstrap, seed=seed)
    primary = paired_interval(cfg.metric, y_judge, base_j, cand_j, prior, one_sided_alpha=level, **boot)
    f1 = paired_interval("macro_f1", y_judge, base_j, cand_j, prior, one_sided_alpha=alpha, **boot)
    plain = primary if last else paired_interval(cfg.metric, y_judge, base_j, cand_j, prior,
                                                 one_sided_alpha=alpha, **boot)  # for futility and harm

    superiority = primary.lower > cfg.min_delta
    non_inferiority = primary.lower > -cfg.margin
    harm = plain.upper < -cfg.margin
    threshold = cfg.min_delta if cfg.admit == "superiority" else -cfg.margin
    passes = primary.lower > threshold
    cannot_pass = plain.upper <= threshold

    support = np.bincount(y_judge, minlength=k)
    r_before = np.nanmean([_recall(y_judge, balanced_predictions(p, prior), k) for p in base_j], axis=0)
    r_after = np.nanmean([_recall(y_judge, balanced_predictions(p, prior), k) for p in cand_j], axis=0)
    per_class: dict[str, dict[str, float | int | None]] = {}
    regressions = []
    for c, name in enumerate(classes):
        if support[c] == 0:
            per_class[name] = {"before": None, "after": None, "delta": None, "support": 0, "allowed": None}
            continue
        d = float(r_after[c] - r_before[c])
        allowed = max(cfg.tolerance, cfg.tolerance_min_images / support[c])
        per_class[name] = {"before": float(r_before[c]), "after": float(r_after[c]), "delta": d,
                           "support": int(support[c]), "allowed": float(allowed)}
        if d < -allowed - 1e-12:
            regressions.append(name)
    f1_ok = f1.lower > -cfg.f1_margin
    checks = {"macro_f1": {"delta": f1.delta, "ci": [f1.lower, f1.upper], "margin": cfg.f1_margin, "passed": f1_ok,
                           "method": f1.method},
              "recall": {"passed": not regressions, "regressions": regressions, "tolerance": cfg.tolerance,
                         "tolerance_min_images": cfg.tolerance_min_images}}

    interval = (f"{cfg.metric} {primary.delta:+.4f} [{primary.lower:+.4f}, {primary.upper:+.4f}] over {s} seed(s)"
                + (f" (per seed {', '.join(f'{v:+.4f}' for v in primary.per_seed)})" if s > 1 else ""))
    bar = (f"min_delta {cfg.min_delta:g} (superiority)" if cfg.admit == "superiority"
           else f"-margin {-cfg.margin:g} (non-inferiority)")
    if passes and f1_ok and not regressions:
        outcome, code = "accept", ("help" if cfg.admit == "superiority" else "no_harm")
        reason = f"{interval}: lower end above {bar}; macro-F1 and per-class recall checks hold"
    elif passes:
        outcome, code = ("reject" if last else "continue"), "check_failed"
        problems = []
        if not f1_ok:
            problems.append(f"macro-F1 {f1.delta:+.4f} [{f1.lower:+.4f}, {f1.upper:+.4f}] may be worse by more than "
                            f"f1_margin {cfg.f1_margin:g}")
        if regressions:
            worst = min(regressions, key=lambda n: per_class[n]["delta"])
            problems.append(f"recall of {', '.join(repr(n) for n in regressions)} drops by more than allowed (worst "
                            f"{worst!r}: {per_class[worst]['delta']:+.4f}, allowed -{per_class[worst]['allowed']:.4f})")
        reason = f"{interval} passes {bar}, but " + "; ".join(problems)
    elif cannot_pass or last:
        outcome = "reject"
        code = "harm" if harm else "no_confident_gain"
        reason = (f"{interval}: " + ("the pool harms (upper end below -margin)" if harm else
                                     f"lower end not above {bar}")
                  + ("" if last else f"; stopped early: the upper end at confidence {cfg.confidence:g} "
                                     f"({plain.upper:+.4f}) is not above it either"))
    else:
        outcome, code, reason = "continue", "no_confident_gain", f"{interval}: undecided, more seeds"
    if outcome == "continue" and last:
        outcome = "reject"
    would_accept = outcome == "accept"
    if not cfg.enabled:
        code = "gate_off"
        reason = f"gate off (ablation): accepted without proof; the gate would have {'accepted' if would_accept else 'rejected'} ({reason})"

    look_rows = [Look(n_seeds=s, level=level, delta=primary.delta, lower=primary.lower, upper=primary.upper,
                      outcome=outcome)]
    return GateDecision(
        accepted=bool(would_accept or not cfg.enabled), reason=reason, reason_code=code, admit=cfg.admit,
        metric=cfg.metric,
        before=Estimate(float(np.mean([metric_value(cfg.metric, y_judge, p, prior) for p in base_j])),
                        method="mean over seeds, judging images"),
        after=Estimate(float(np.mean([metric_value(cfg.metric, y_judge, p, prior) for p in cand_j])),
                       method="mean over seeds, judging images"),
        delta=Estimate(primary.delta, [primary.lower, primary.upper],
                       f"{primary.method}; two-sided level {primary.level:.4f} at this look"),
        superiority=bool(superiority), non_inferiority=bool(non_inferiority), harm=bool(harm),
        min_delta=cfg.min_delta, margin=cfg.margin, checks=checks, per_class=per_class, regressions=regressions,
        looks=look_rows, seeds=[int(v) for v in seeds], n_judge=int(y_judge.size), n_select=int(y_sel.size),
        per_seed=primary.per_seed, seed_sd=primary.seed_sd, gate_enabled=cfg.enabled, would_accept=would_accept,
        stopped_early=bool(outcome != "continue" and not last),
        weak_classes=sorted({int(c) for c in weak_classes}) if weak_classes else None)


def outcome(decision: GateDecision) -> str:
    """accept | reject | continue at the decision's latest look."""
    return decision.looks[-1].outcome if decision.looks else ("accept" if decision.accepted else "reject")
