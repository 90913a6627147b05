"""Out-of-fold judgement: no train image is predicted by a model that trained on it; folds are stratified and seeded."""

from __future__ import annotations

import numpy as np
import pytest

import vision_si.oof as oof_module
from vision_si.config import ClassifierConfig, DiagnoseConfig
from vision_si.data.arrays import LabelledImages
from vision_si.diagnose import diagnose
from vision_si.errors import DataError
from vision_si.oof import assign_folds, out_of_fold

CFG = ClassifierConfig(arch="resnet10t", model_kwargs={"channels": [8, 16, 32, 64]}, steps=4, batch_size=8,
                       warmup_steps=1, eval_every=4, device="cpu", bn_recalibrate=False)


def images_with_row_numbers(n: int, size: int = 8) -> np.ndarray:
    """Every image unique: row i's pixels are all i / n, so an image names its row."""
    return np.repeat((np.arange(n, dtype=np.float32) / n)[:, None, None, None], size * size, 1).reshape(n, 1, size, size)


def row_of(images: np.ndarray, n: int) -> list[int]:
    return [int(round(float(x[0, 0, 0]) * n)) for x in images]


def test_folds_are_stratified_seeded_and_cover_every_row():
    labels = np.repeat([0, 1, 2], [50, 20, 7])
    folds = assign_folds(labels, 5, seed=3)
    assert sorted(set(folds.tolist())) == [0, 1, 2, 3, 4]
    for k, n in ((0, 50), (1, 20)):
        assert np.bincount(folds[labels == k], minlength=5).tolist() == [n // 5] * 5
    assert np.bincount(folds[labels == 2], minlength=5).max() <= 2  # a scarce class is spread, not clumped
    assert (assign_folds(labels, 5, seed=3) == folds).all()
    assert not (assign_folds(labels, 5, seed=4) == folds).all()
    with pytest.raises(DataError, match="oof_folds"):
        assign_folds(np.array([0, 1, 2]), 5, seed=0)


def test_no_image_is_predicted_by_a_model_that_trained_on_it(tmp_path, monkeypatch):
    n, k = 36, 3
    x = images_with_row_numbers(n)
    y = np.arange(n) % k
    trained, predicted = {}, []  # model path -> rows it trained on; (model path, rows it predicted)
    real_train, real_predict = oof_module.train_classifier, oof_module.predict

    def spy_train(cfg, images, labels, **kw):
        clf = real_train(cfg, images, labels, **kw)
        trained[str(clf.path)] = set(row_of(images, n))
        return clf

    def spy_predict(clf, images, **kw):
        predicted.append((str(clf.path), row_of(images, n)))
        return real_predict(clf, images, **kw)

    monkeypatch.setattr(oof_module, "train_classifier", spy_train)
    monkeypatch.setattr(oof_module, "predict", spy_predict)
    res = out_of_fold(CFG, x, y, classes=["a", "b", "c"], n_folds=3, seed=0, out_dir=tmp_path)
    assert len(trained) == 3 and len(predicted) == 3
    seen = []
    for path, rows in predicted:
        assert trained[path].isdisjoint(rows)  # the fold's model never saw the images it judges
        assert trained[path] | set(rows) == set(range(n))  # and trained on all the others
        seen += rows
    assert sorted(seen) == list(range(n))  # every train image judged exactly once
    for f in range(3):  # the recorded folds say the same
        held = set(np.flatnonzero(res.folds == f).tolist())
        assert held.isdisjoint(res.trained_on[f].tolist()) and trained[res.model_paths[f]] == set(res.trained_on[f])
    assert res.probs.shape == (n, k) and np.allclose(res.probs.sum(1), 1, atol=1e-4)


def test_out_of_fold_predictions_feed_the_diagnosis(tmp_path):
    n, k = 30, 3
    x = images_with_row_numbers(n)
    y = np.arange(n) % k
    res = out_of_fold(CFG, x, y, classes=["a", "b", "c"], n_folds=2, seed=1, out_dir=tmp_path, epochs=1.0)
    rng = np.random.default_rng(0)
    val_y = np.arange(12) % k
    val_probs = rng.dirichlet(np.ones(k), 12)
    diag = diagnose(DiagnoseConfig(n_bootstrap=100), classes=["a", "b", "c"],
                    val=LabelledImages.of_labels(val_y, [f"v{i}" for i in range(12)]), val_probs=val_probs,
                    val_embeddings=rng.standard_normal((12, 4)), train=LabelledImages.of_labels(y, [f"t{i}" for i in range(n)]),
                    train_embeddings=rng.standard_normal((n, 4)), seed=0, train_probs=res.probs, train_folds=res.folds)
    assert diag.judged == "val+oof-train"
    assert diag.members["oof_fold"][12:].tolist() == res.folds.tolist()
    assert sum(s.n_judged for s in diag.slices) == 12 + n  # every val and train image judged once


def test_a_run_judges_train_out_of_fold_from_the_selecting_val_half_only(tmp_path):
    import csv

    from tiny_run import make_run

    from vision_si.diagnose import Diagnosis

    rd = make_run(tmp_path, until="diagnose", data={"max_per_class": 30, "augment": "none"},
                  diagnose={"oof_folds": 2, "oof_epochs": 0.5})
    d = rd / "round-00" / "diagnose"
    diag = Diagnosis.load(d)
    assert diag.judged == "val+oof-train"
    assert (d / "oof" / "fold-0" / "model.safetensors").is_file() and (d / "oof" / "fold-1" / "model.safetensors").is_file()
    with (rd / "splits.csv").open(newline="") as fh:
        split_of = {r["id"]: r["split"] for r in csv.DictReader(fh)}
    m = diag.members
    val_ids = [i for i, s in zip(m["id"], m["split"], strict=True) if s == "val"]
    assert all(split_of[i] == "val" for i in val_ids)
    # only the selecting half of val: the judging half (gate.judge_fraction) is left to the gate
    n_val = sum(s == "val" for s in split_of.values())
    assert 0 < len(val_ids) < n_val
    train_rows = m["split"] == "train"
    assert sorted(m["id"][train_rows].tolist()) == sorted(i for i, s in split_of.items() if s == "train")
    assert set(m["oof_fold"][train_rows].tolist()) == {0, 1} and set(m["oof_fold"][~train_rows].tolist()) == {-1}
    assert "test" not in set(m["split"].tolist())


@pytest.mark.parametrize("key, value", [("oof_folds", 1), ("oof_folds", 21), ("oof_epochs", 0),
                                        ("stability_resamples", -1)])
def test_bad_diagnose_settings_name_the_key(key, value):
    from vision_si.config import RunConfig, validate_config
    from vision_si.errors import ConfigError

    cfg = RunConfig()
    setattr(cfg.diagnose, key, value)
    with pytest.raises(ConfigError, match=f"diagnose.{key}"):
        validate_config(cfg)
