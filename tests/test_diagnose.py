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


# --------------------------------------------------------------------------- issue 17: hidden failures


def small_val(seed: int, fraction: float = 0.08) -> dict:
    """The planted data with a val split too small to show the sub-group's failure on its own."""
    data = synthetic(seed, planted=True)
    data["val"] = np.random.default_rng(100 + seed).random(data["y"].size) < fraction
    return data


def flagged(diag) -> np.ndarray:
    """Val-then-train rows that lie in a weak slice of any view."""
    columns = [diag.members["slice_id"]] + [diag.members[f"slice_id_{v}"] for v in diag.views[1:]]
    weak = [s.slice_id for s in diag.weak_slices]
    return np.any([np.isin(c, weak) for c in columns], axis=0)


@pytest.mark.parametrize("seed", [0, 3])
def test_out_of_fold_train_predictions_find_a_slice_val_alone_misses(seed):
    data = small_val(seed)
    v, t = data["val"], ~data["val"]
    truth = np.concatenate([data["group"][v], data["group"][t]])
    assert run(data, seed=seed).weak_slices == []  # a few val images of the sub-group: no evidence
    folds = np.arange(t.sum()) % 5
    diag = run(data, seed=seed, train_probs=data["probs"][t], train_folds=folds)
    assert diag.judged == "val+oof-train"
    assert [s.class_index for s in diag.weak_slices] == [0]
    hit = flagged(diag)
    assert (hit & truth).sum() / hit.sum() >= 0.95  # precision over val ∪ train
    assert (hit & truth).sum() / truth.sum() >= 0.95  # recall
    s = diag.weak_slices[0]
    assert s.n_judged == s.n_val + s.n_train and s.n_judged_errors > s.n_val_errors
    assert s.rest_error_rate < 0.15 < s.error_rate and s.top_confusion == "a -> b"
    assert diag.members["oof_fold"].tolist() == [-1] * v.sum() + folds.tolist()
    # metrics stay val-only
    assert diag.per_class[0].support == (data["y"][v] == 0).sum()


def tiny_group(seed: int) -> dict:
    """Class 0 holds a far-off group of 4 val + 4 train images, every val one wrong; elsewhere 2% errors."""
    rng = np.random.default_rng(seed)
    k, n_per, d = len(CLASSES), 200, 16
    centres = rng.standard_normal((k, d)) * 4
    x = np.concatenate([centres[c] + rng.standard_normal((n_per, d)) for c in range(k)]).astype(np.float32)
    y = np.repeat(np.arange(k), n_per)
    group = np.zeros(y.size, bool)
    group[:8] = True
    x[group] += rng.standard_normal(d) * 6
    is_val = np.zeros(y.size, bool)
    is_val[:4] = True
    is_val[8:] = rng.random(y.size - 8) < 0.5
    wrong = np.where(group, is_val, rng.random(y.size) < 0.02)
    pred = np.where(wrong, (y + 1) % k, y)
    probs = np.full((y.size, k), 0.1)
    probs[np.arange(y.size), pred] = 1 - 0.1 * (k - 1)
    return {"x": x, "y": y, "group": group, "val": is_val, "probs": probs,
            "ids": np.array([f"img{i:05d}" for i in range(y.size)])}


def test_a_small_slice_is_reported_on_evidence_when_the_size_floor_allows_it():
    data = tiny_group(0)
    assert run(data, DiagnoseConfig(n_bootstrap=200, min_slice_size=5)).weak_slices == []  # 4 < floor of 5
    diag = run(data, DiagnoseConfig(n_bootstrap=200, min_slice_size=3))
    assert len(diag.weak_slices) == 1
    s = diag.weak_slices[0]
    assert s.n_val == 4 and s.n_val_errors == 4 and s.class_index == 0
    v = data["val"]
    in_slice = diag.members["slice_id"][: v.sum()] == s.slice_id
    assert (in_slice == data["group"][v]).all()


def test_uniform_errors_stay_unreported_at_a_low_size_floor():
    found = []
    for seed in range(5):
        found += run(synthetic(seed, planted=False), DiagnoseConfig(n_bootstrap=200, min_slice_size=3),
                     seed=seed).weak_slices
    assert found == []


def test_slice_is_described_by_the_metadata_value_it_is_enriched_for():
    data = synthetic(0, planted=True)
    v, t = data["val"], ~data["val"]
    rng = np.random.default_rng(5)
    p_mono = np.where(data["group"], 0.9, 0.3)
    cell_type = np.where(rng.random(data["y"].size) < p_mono, "mono", "poly")
    noise = rng.choice(["x", "y", "z"], data["y"].size)
    order = lambda a: np.concatenate([a[v], a[t]])  # noqa: E731  (val rows then train rows)
    diag = run(data, metadata={"type": order(cell_type), "site": order(noise)})
    s = diag.weak_slices[0]
    assert s.enriched_for == "type=mono"
    assert s.enrichment_odds_ratio > 3 and s.enrichment_p < 0.05
    assert "a -> b" in s.description and "enriched for type=mono" in s.description
    # a column with nothing to say does not describe the slice
    plain = run(data, metadata={"site": order(noise)}).weak_slices[0]
    assert plain.enrichment_p is None or plain.enrichment_p > 0.001
    with pytest.raises(DataError, match="metadata"):
        run(data, metadata={"type": cell_type[:10]})


def test_a_label_free_view_finds_a_slice_the_classifiers_embeddings_hide():
    data = synthetic(1, planted=True)
    v, t = data["val"], ~data["val"]
    rng = np.random.default_rng(9)
    # the classifier's view: the sub-group's shift removed, so class 0 is one blob
    x_clf = data["x"].copy()
    x_clf[data["group"]] = data["x"][~data["group"] & (data["y"] == 0)][: data["group"].sum()]
    ssl = np.concatenate([data["x"], rng.standard_normal((data["y"].size, 8)).astype(np.float32)], axis=1)
    diag = diagnose(DiagnoseConfig(n_bootstrap=200), classes=CLASSES, val=split(data, v), val_probs=data["probs"][v],
                    val_embeddings=x_clf[v], train=split(data, t), train_embeddings=x_clf[t], seed=0,
                    extra_views={"ssl": (ssl[v], ssl[t])})
    assert diag.views == ["classifier", "ssl"]
    assert [(s.view, s.class_index) for s in diag.weak_slices] == [("ssl", 0)]
    s = diag.weak_slices[0]
    assert s.slice_id.startswith("ssl-c0-") and s.description.startswith("[ssl]")
    in_slice = diag.members["slice_id_ssl"][: v.sum()] == s.slice_id
    truth = data["group"][v]
    assert (in_slice & truth).sum() / (in_slice | truth).sum() >= 0.8
    assert any(a.slice_id == s.slice_id for a in diag.budget)
    with pytest.raises(DataError, match="extra_views"):
        run(data, extra_views={"ssl": (ssl[v][:5], ssl[t])})


def test_stability_is_high_for_a_planted_slice_and_weighs_the_budget():
    diag = run(synthetic(0, planted=True), DiagnoseConfig(n_bootstrap=200, stability_resamples=8))
    weak = diag.weak_slices[0]
    assert weak.stability >= 0.85
    assert all(0.0 <= s.stability <= 1.0 for s in diag.slices)
    assert all(s.stability <= 0.5 for s in diag.slices if s.class_index != 0)  # nothing to find there
    assert run(synthetic(0, planted=True)).weak_slices[0].stability is None  # off by default


def test_new_fields_round_trip_and_old_files_still_load(tmp_path):
    import csv
    import json

    data = small_val(0)
    t = ~data["val"]
    diag = run(data, DiagnoseConfig(n_bootstrap=200, stability_resamples=2), train_probs=data["probs"][t],
               train_folds=np.arange(t.sum()) % 3, extra_views={"ssl": (data["x"][data["val"]], data["x"][t])})
    diag.save(tmp_path / "new")
    back = Diagnosis.load(tmp_path / "new")
    assert back.to_dict() == diag.to_dict()
    for key in ("oof_fold", "slice_id_ssl"):
        assert back.members[key].tolist() == diag.members[key].tolist()
    # a diagnosis written before these fields: no judged/views, slices without the new keys, 4 member columns
    old = json.loads((tmp_path / "new" / "diagnosis.json").read_text())
    for key in ("judged", "views"):
        old.pop(key)
    new_keys = ("view", "n_judged", "n_judged_errors", "class_n_judged", "rest_error_rate", "stability",
                "top_confusion", "enriched_for", "enrichment_odds_ratio", "enrichment_p", "description")
    old["slices"] = [{k: v for k, v in s.items() if k not in new_keys} for s in old["slices"]]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "diagnosis.json").write_text(json.dumps(old))
    with (tmp_path / "old" / "members.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "split", "class_index", "slice_id"])
        w.writerow(["img00001", "val", 0, "c0-s0"])
    legacy = Diagnosis.load(tmp_path / "old")
    assert legacy.judged == "val" and legacy.views == ["classifier"]
    assert all(s.view == "classifier" and s.stability is None for s in legacy.slices)
    assert set(legacy.members) == {"id", "split", "class_index", "slice_id"}
