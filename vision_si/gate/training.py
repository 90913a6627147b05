"""`run_gate`: train the two sides of the comparison, seed pair by seed pair, look, and stop by the design.

For each paired seed s both sides are trained with the classifier recipe from the same starting
weights and the same real batches (the loader's common random numbers); the only difference is
that the candidate side's batches carry the synthetic pool plus this round's candidates in their
synthetic slots, the baseline side's only the pool accepted so far.

- `gate.start: warm` (default): both sides start from the current model and fine-tune for
  `gate.finetune_epochs` epochs of the real training images at `gate.finetune_lr`, without EMA.
  What differs between seeds is then only the fine-tuning's batch order and augmentation draws.
- `gate.start: scratch`: both sides train the full recipe from seed s's random initialisation.

Seeds come in looks of `gate.seeds_per_look` up to `gate.max_seeds`; after each look `decide` says
accept, reject or continue. The models go to `out_dir/baseline-k/` and `out_dir/candidate-k/`
(k-th seed); a finished folder is loaded and a partial one resumed (train_classifier's contract), so
a killed gate resumes where it stopped. With the Ray engine the trainings of one look run as Ray
tasks (`engine="ray"`), each pinned to the thread count the local engine would use, so both engines
train the same weights and reach the same decision.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vision_si.classifier import TrainedClassifier, load_classifier, predict, train_classifier
from vision_si.config import ClassifierConfig, GateConfig
from vision_si.data.arrays import LabelledImages
from vision_si.gate.decision import GateDecision, SidePredictions, decide, outcome

SIDES = ("baseline", "candidate")


def finetune_config(clf_cfg: ClassifierConfig, cfg: GateConfig) -> ClassifierConfig:
    """The classifier recipe for one side of a warm-started comparison."""
    return dataclasses.replace(clf_cfg, epochs=cfg.finetune_epochs, warmup_steps=None, ema=False,
                               select_best_on_val=False,
                               lr=cfg.finetune_lr if cfg.finetune_lr is not None else clf_cfg.lr / 4)


@dataclasses.dataclass(frozen=True)
class TrainingJob:
    """One side of one seed: everything a worker needs to train it."""

    side: str
    index: int
    seed: int
    out_dir: str
    extra: LabelledImages | None


def _log_probs(clf: TrainedClassifier, images: np.ndarray, batch_size: int) -> np.ndarray:
    logits = predict(clf, images, batch_size=batch_size).logits.astype(np.float64)
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


def train_side(job: TrainingJob, *, clf_cfg: ClassifierConfig, train: LabelledImages, classes: Sequence[str],
               augment: Callable[[int], Any] | None, init_from: TrainedClassifier | None, progress: bool,
               threads: int | None = None) -> TrainedClassifier:
    """Train one side of one seed into `job.out_dir` (loaded when already finished)."""
    if threads is not None:
        torch.set_num_threads(threads)
    extra = job.extra
    return train_classifier(clf_cfg, train.images, train.labels, classes=list(classes), seed=job.seed,
                            out_dir=job.out_dir, extra_images=None if extra is None else extra.images,
                            extra_labels=None if extra is None else extra.labels,
                            extra_ids=None if extra is None else extra.ids,
                            augment=augment(job.seed) if augment is not None else None, progress=progress,
                            init_from=init_from)


def _run_local(jobs: Sequence[TrainingJob], **kw: Any) -> None:
    for job in jobs:
        train_side(job, **kw)


def _run_ray(jobs: Sequence[TrainingJob], *, address: str | None, progress: bool, **kw: Any) -> None:
    from vision_si.generators.ray_engine import ray_session

    threads = torch.get_num_threads()
    with ray_session(address, progress=progress) as ray:
        remote = ray.remote(num_cpus=threads)(train_side)
        shared = {k: ray.put(v) for k, v in kw.items()}
        ray.get([remote.remote(job, threads=threads, progress=False, **shared) for job in jobs])


def run_gate(cfg: GateConfig, clf_cfg: ClassifierConfig, *, train: LabelledImages, pool: LabelledImages | None,
             candidates: LabelledImages, select: LabelledImages, judge: LabelledImages, classes: Sequence[str],
             seed: int, out_dir: str | Path, current: TrainedClassifier | None = None,
             augment: Callable[[int], Any] | None = None, weak_classes: Sequence[int] | None = None,
             engine: str = "local", ray_address: str | None = None, progress: bool = True) -> GateDecision:
    """Train paired sides look by look and decide (module doc). `current` is required for `gate.start: warm`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.start == "warm" and current is None:
        raise ValueError("gate.start 'warm' needs the current model (current=...)")
    side_cfg = finetune_config(clf_cfg, cfg) if cfg.start == "warm" else clf_cfg
    init = current if cfg.start == "warm" else None
    pool = pool if pool is not None and len(pool) else None
    extra = {"baseline": pool, "candidate": candidates if pool is None else LabelledImages.concat([pool, candidates])}
    if not len(candidates):
        return _no_candidates(cfg, classes, select, judge, seed, weak_classes)

    start = time.time()
    preds: dict[str, dict[str, list[np.ndarray]]] = {side: {"select": [], "judge": []} for side in SIDES}
    looks, decision, done = [], None, 0
    kw = dict(clf_cfg=side_cfg, train=train, classes=list(classes), augment=augment, init_from=init)
    for n_seeds in cfg.look_schedule():
        jobs = [TrainingJob(side, k, seed + k, str(out / f"{side}-{k}"), extra[side])
                for k in range(done, n_seeds) for side in SIDES]
        if engine == "ray":
            _run_ray(jobs, address=ray_address, progress=progress, **kw)
        else:
            _run_local(jobs, progress=progress, **kw)
        for k in range(done, n_seeds):
            for side in SIDES:
                model = load_classifier(out / f"{side}-{k}", clf_cfg.device)
                preds[side]["select"].append(_log_probs(model, select.images, clf_cfg.predict_batch_size))
                preds[side]["judge"].append(_log_probs(model, judge.images, clf_cfg.predict_batch_size))
        done = n_seeds
        sides = {side: SidePredictions(np.stack(preds[side]["select"]), np.stack(preds[side]["judge"]))
                 for side in SIDES}
        decision = decide(cfg, classes=classes, select_labels=select.labels, judge_labels=judge.labels,
                          baseline=sides["baseline"], candidate=sides["candidate"],
                          seeds=[seed + k for k in range(n_seeds)], weak_classes=weak_classes, seed=seed)
        looks += decision.looks
        if outcome(decision) != "continue":
            break
    assert decision is not None  # the schedule has at least one look
    decision.looks = looks
    decision.training = {"start": cfg.start, "steps_per_side": _steps(side_cfg, len(train)),
                         "lr": side_cfg.lr, "n_train": len(train), "n_pool": len(pool) if pool is not None else 0,
                         "n_candidates": len(candidates), "synthetic_share": clf_cfg.synthetic_share,
                         "models": [f"{side}-{k}" for k in range(done) for side in SIDES],
                         "judge_ids": list(judge.ids), "select_ids": list(select.ids),
                         "engine": engine, "seconds": time.time() - start}
    decision.save(out)
    return decision


def _steps(cfg: ClassifierConfig, n_real: int) -> int:
    from vision_si.classifier.training import train_steps

    return train_steps(cfg, n_real)


def _no_candidates(cfg: GateConfig, classes: Sequence[str], select: LabelledImages, judge: LabelledImages,
                   seed: int, weak_classes: Sequence[int] | None) -> GateDecision:
    """Nothing passed the filter: nothing to add, nothing trained; the round is skipped."""
    k = len(classes)
    flat = SidePredictions(np.full((cfg.seeds_per_look, len(select), k), -np.log(k)),
                           np.full((cfg.seeds_per_look, len(judge), k), -np.log(k)))
    d = decide(cfg, classes=classes, select_labels=select.labels, judge_labels=judge.labels, baseline=flat,
               candidate=flat, seeds=[seed + i for i in range(cfg.seeds_per_look)], weak_classes=weak_classes,
               seed=seed)
    d.accepted, d.would_accept, d.reason_code = False, False, "no_candidates"
    d.reason = "no candidate passed the filter: nothing to add, no model trained"
    return d
