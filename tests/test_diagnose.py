"""Diagnosis on synthetic embeddings where the truth is known: intervals, planted slices, files."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from vision_si.config import DiagnoseConfig
from vision_si.data.arrays import LabelledImages
from vision_si.diagnose import Diagnosis, diagnose
from vision_si.errors import DataError
from vision_si.metrics import bootstrap_confusions, confusion_metric_samples, wilson_interval
from vision_si.report_plots import write_diagnosis_plots

CLASSES = ["a", "b", "c", "d"]


def synthetic(seed: int, *, planted: bool, n_per: int = 400, d: int = 64, frac: float = 0.1,
              base_error: float = 0.08, slice_error: float = 0.7):
    """Four Gaussian classes; class 0 holds a shifted sub-group (`frac` of it).

    With `planted`, the sub-group is wrong `slice_error` of the time (mostly predicted as class 1)
    and everything else `base_error`; without, every image is wrong at the same overall rate, so the
    sub-group exists in embedding space but is no weaker than its class.
    """
    rng = np.random.default_rng(seed)
    k = len(CLASSES)
    centres = rng.standard_normal((k, d)) * 3
    shift = rng.standard_normal(d) * 3
    x = np.concatenate([centres[c] + rng.standard_normal((n_per, d)) for c in range(k)]).astype(np.float32)
    y = np.repeat(np.arange(k), n_per)
    group = np.zeros(y.size, dtype=bool)
    group[: int(frac * n_per)] = True
    x[group] += shift
    is_val = rng.random(y.size) < 0.5
    p_err = np.where(group, slice_error, base_error) if planted else np.full(y.size, 0.12)
    wrong = rng.random(y.size) < p_err
    other = np.where(group, 1, (y + rng.integers(1, k, y.size)) % k)
    pred = np.where(wrong, other, y)
    probs = rng.dirichlet(np.ones(k), y.size) * 0.3
    probs[np.arange(y.size), pred] += 0.7
    ids = np.array([f"img{i:05d}" for i in range(y.size)])
    return {"x": x, "y": y, "group": group, "val": is_val, "probs": probs, "ids": ids}


def split(data, rows) -> LabelledImages:
    return LabelledImages.of_labels(data["y"][rows], data["ids"][rows])


def run(data, cfg=None, seed=0, **kw):
    v, t = data["val"], ~data["val"]
    return diagnose(cfg or DiagnoseConfig(n_bootstrap=200), classes=CLASSES, val=split(data, v),
                    val_probs=data["probs"][v], val_embeddings=data["x"][v], train=split(data, t),
                    train_embeddings=data["x"][t], seed=seed, **kw)


def test_wilson_interval_covers_the_truth_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    hits = trials = 0
    for p in (0.05, 0.2, 0.5, 0.8):
        for n in (20, 60, 200):
            for x in rng.binomial(n, p, size=250):
                lo, hi = wilson_interval(int(x), n, 0.95)
                hits += lo <= p <= hi
                trials += 1
    assert hits / trials >= 0.93


def test_bootstrap_intervals_cover_the_truth_in_simulation():
    rng = np.random.default_rng(1)
    true_cm = np.array([[0.3, 0.05], [0.1, 0.55]])  # joint probabilities of (true, predicted)
    truth = confusion_metric_samples((true_cm * 1e6)[None])
    covered = {"accuracy": 0, "balanced_accuracy": 0, "macro_f1": 0}
    for rep in range(200):
        cm = rng.multinomial(300, true_cm.ravel()).reshape(2, 2)
        samples = confusion_metric_samples(bootstrap_confusions(cm, 400, seed=rep))
        for name in covered:
            lo, hi = np.nanpercentile(samples[name], [2.5, 97.5])
            covered[name] += lo <= truth[name][0] <= hi
    for name, hits in covered.items():
        assert hits / 200 >= 0.9, name


def test_bootstrap_confusions_match_the_image_bootstrap():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 500)
    preds = np.where(rng.random(500) < 0.8, labels, rng.integers(0, 3, 500))
    cm = np.zeros((3, 3), int)
    np.add.at(cm, (labels, preds), 1)
    draws = bootstrap_confusions(cm, 2000, seed=0)
    idx = rng.integers(0, 500, (2000, 500))
    by_image = (labels[idx] == preds[idx]).mean(1)
    by_cells = confusion_metric_samples(draws)["accuracy"]
    assert draws.sum(axis=(1, 2)).tolist() == [500] * 2000
    assert abs(by_image.std() - by_cells.std()) < 0.003
    assert abs(by_image.mean() - by_cells.mean()) < 0.003


def test_per_class_report_is_consistent_with_the_predictions():
    data = synthetic(0, planted=True)
    diag = run(data)
    v = data["val"]
    preds = data["probs"][v].argmax(1)
    y = data["y"][v]
    for c in diag.per_class:
        m = y == c.class_index
        assert c.support == m.sum()
        assert c.recall == pytest.approx((preds[m] == c.class_index).mean())
        assert c.recall_ci[0] <= c.recall <= c.recall_ci[1]
        assert c.f1_ci[0] <= c.f1 <= c.f1_ci[1]
    assert diag.overall["accuracy"]["value"] == pytest.approx((preds == y).mean())
    top = diag.confused_pairs[0]
    assert (top["true"], top["predicted"]) == ("a", "b")  # the planted sub-group's errors go to b


@pytest.mark.parametrize("method", ["gmm", "hdbscan"])
def test_planted_weak_slice_is_recovered(method):
    data = synthetic(3, planted=True)
    diag = run(data, DiagnoseConfig(n_bootstrap=200, cluster_method=method))
    weak = diag.weak_slices
    assert [s.class_index for s in weak] == [0]
    v = data["val"]
    in_slice = diag.members["slice_id"][: v.sum()] == weak[0].slice_id
    truth = data["group"][v]
    jaccard = (in_slice & truth).sum() / (in_slice | truth).sum()
    assert jaccard >= 0.8
    assert weak[0].dominant_wrong_class == "b"
    assert weak[0].error_ci[0] > diag.per_class[0].error_rate
    train_ids = set(data["ids"][~v])
    assert weak[0].exemplar_ids and set(weak[0].exemplar_ids) <= train_ids  # never val images
    units = {(a.class_name, a.slice_id) for a in diag.budget}
    assert ("a", weak[0].slice_id) in units


def test_no_weak_slice_when_errors_are_uniform():
    found = []
    for seed in range(10):
        diag = run(synthetic(seed, planted=False), seed=seed)
        # the sub-group still forms its own cluster: only its error rate is ordinary
        assert len([s for s in diag.slices if s.class_index == 0]) >= 2
        found += diag.weak_slices
    assert found == []


def test_budget_is_exact_and_carries_generation_fields():
    from vision_si.config import LoopConfig
    from vision_si.stages import generation_requests

    diag = run(synthetic(0, planted=True), DiagnoseConfig(n_bootstrap=200, budget_total=97, budget_floor=5))
    assert sum(a.count for a in diag.budget) == 97
    assert all(5 <= a.count <= int(0.6 * 97) for a in diag.budget)
    req = generation_requests(diag.budget, LoopConfig(), rejected=0)[0]
    a = diag.budget[0]
    assert (req.class_index, req.slice_id, req.count, req.exemplar_ids, req.mode, req.strength) == (
        a.class_index, a.slice_id, a.count, a.exemplar_ids, a.mode, a.strength)


def test_save_load_round_trip(tmp_path):
    diag = run(synthetic(0, planted=True))
    diag.save(tmp_path)
    for name in ("diagnosis.json", "per_class.csv", "slices.csv", "budget.csv", "members.csv"):
        assert (tmp_path / name).is_file()
    back = Diagnosis.load(tmp_path)
    assert back.to_dict() == diag.to_dict()
    for key in ("id", "split", "slice_id"):
        assert back.members[key].tolist() == diag.members[key].tolist()
    assert back.members["class_index"].tolist() == diag.members["class_index"].tolist()


def test_plots_are_written(tmp_path):
    data = synthetic(0, planted=True)
    diag = run(data)
    v = data["val"]
    images = {i: np.full((1, 8, 8), j / len(data["ids"]), np.float32) for j, i in enumerate(data["ids"])}
    paths = write_diagnosis_plots(diag, tmp_path, val_embeddings=data["x"][v], val_labels=data["y"][v],
                                  val_probs=data["probs"][v], images_by_id=images)
    names = {p.relative_to(tmp_path).as_posix() for p in paths}
    assert {"confusion.png", "recall.png", "embedding_map.png"} <= names
    assert f"slices/{diag.weak_slices[0].slice_id}.png" in names
    for p in paths:
        assert p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 1000


def test_importing_and_plotting_leave_the_matplotlib_backend_and_pyplot_alone(tmp_path):
    """A notebook keeps its inline backend: the plots module chooses none and opens no pyplot figure."""
    script = f"""
import matplotlib
matplotlib.use("svg")
import matplotlib.pyplot as plt
import vision_si.report_plots as plots
from types import SimpleNamespace
from pathlib import Path
diag = SimpleNamespace(confusion=[[3, 1], [0, 2]], classes=["a", "b"])
fig_path = plots.plot_confusion(diag, Path({str(tmp_path / "c.png")!r}))
print(matplotlib.get_backend(), len(plt.get_fignums()), fig_path.exists())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["svg", "0", "True"]


def test_bad_inputs_name_the_problem():
    data = synthetic(0, planted=True)
    v = data["val"]
    with pytest.raises(DataError, match="val_probs"):
        run({**data, "probs": np.log(data["probs"])})
    with pytest.raises(DataError, match="val_probs: expected shape"):
        diagnose(DiagnoseConfig(), classes=CLASSES, val=split(data, v), val_probs=data["probs"][v][:, :3],
                 val_embeddings=data["x"][v], train=split(data, ~v), train_embeddings=data["x"][~v], seed=0)
    with pytest.raises(DataError, match="unique"):
        run({**data, "ids": np.array(["same"] * data["y"].size)})
