"""Out-of-fold judgement of train images: every train image predicted by a model that never trained on it.

The diagnosed model has fitted its train images, so its predictions on them say little about where it
fails. `out_of_fold` splits train into `n_folds` folds, stratified by class (scikit-learn's
`StratifiedKFold`, shuffled with the run's seed), trains one classifier per fold on the other folds
with the run's recipe (`train_classifier` with the `ClassifierConfig`; `epochs` may shorten each fold
model's budget) and predicts the held-out fold with it. The diagnosis then judges slices on val and
on these predictions (`diagnose(..., train_probs=oof.probs, train_folds=oof.folds)`).

The fold models train on the real train split only, never on the pool of accepted synthetic images:
a synthetic image made from an exemplar in the held-out fold would leak that image into its judge.
They see `val_images` only as the recipe's history (and its `select_best_on_val`), as the diagnosed
model does; the caller hands the selecting half of val, never the judging half, never test.
Fold k's model is seeded `seed + k` (`config.model_seeds`) and lives in `out_dir/fold-k/`; a finished
fold is loaded, a crashed one resumes (`train_classifier`'s contract).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from vision_si.classifier import predict, train_classifier
from vision_si.config import ClassifierConfig, model_seeds
from vision_si.errors import DataError


@dataclass
class OutOfFold:
    """`probs[i]` came from the model of fold `folds[i]`, which trained on the rows `trained_on[folds[i]]`."""

    probs: np.ndarray  # N×K float32
    folds: np.ndarray  # N int64
    trained_on: list[np.ndarray]  # per fold, the train rows its model trained on (every row not in the fold)
    model_paths: list[str]


def assign_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Each row's fold in 0..n_folds-1, stratified by class and shuffled by `seed`.

    A class with fewer images than folds leaves some folds without it (scikit-learn's warning is
    silenced: that is expected of scarce classes); fewer images than folds overall is a DataError.
    """
    y = np.asarray(labels)
    if n_folds < 2:
        raise DataError(f"oof_folds: need at least 2 folds, got {n_folds}")
    if y.size < n_folds or np.bincount(y).max() < n_folds:
        raise DataError(f"oof_folds: {n_folds} folds need a class with at least {n_folds} train images; "
                        f"the largest has {int(np.bincount(y).max()) if y.size else 0}")
    folds = np.empty(y.size, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        for f, (_, held) in enumerate(splitter.split(np.zeros(y.size), y)):
            folds[held] = f
    return folds


def out_of_fold(cfg: ClassifierConfig, images: np.ndarray, labels: np.ndarray, *, classes: Sequence[str],
                n_folds: int, seed: int, out_dir: str | Path, epochs: float | None = None,
                val_images: np.ndarray | None = None, val_labels: np.ndarray | None = None,
                augment: Callable[[int], Any] | None = None, progress: bool = False) -> OutOfFold:
    """Train `n_folds` cross-fitted classifiers over the train images and predict each held-out fold.

    `augment(seed)` builds the augmentation of a fold model (as the run builds its own), or None.
    """
    labels = np.asarray(labels)
    folds = assign_folds(labels, n_folds, seed)
    fold_cfg = cfg if epochs is None else replace(cfg, epochs=float(epochs))
    probs = np.zeros((labels.size, len(classes)), dtype=np.float32)
    trained_on, paths = [], []
    for f, fold_seed in enumerate(model_seeds(seed, n_folds)):
        held, rows = np.flatnonzero(folds == f), np.flatnonzero(folds != f)
        clf = train_classifier(fold_cfg, images[rows], labels[rows], classes=classes, seed=fold_seed,
                               out_dir=Path(out_dir) / f"fold-{f}", val_images=val_images, val_labels=val_labels,
                               augment=augment(fold_seed) if augment is not None else None, progress=progress)
        probs[held] = predict(clf, images[held], batch_size=cfg.predict_batch_size).probs
        trained_on.append(rows)
        paths.append(str(clf.path))
    return OutOfFold(probs=probs, folds=folds, trained_on=trained_on, model_paths=paths)
