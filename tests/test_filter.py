"""The filter: each planted bad candidate is rejected for its own reason, good ones pass.

The world is small and known: digits images (8×8) for pixels, and hand-made embeddings (class
centres plus noise) that stand in for the critic's, so the embedding path and the pixel path of
each near-copy check can be planted separately.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError

from vision_si.config import ClassifierConfig, FilterConfig, config_from_dict
from vision_si.data.arrays import LabelledImages
from vision_si.errors import ConfigError, DataError, InputError
from vision_si.filter import (
    FILTERS,
    PRIORITY,
    FilterResult,
    ModelOutputs,
    RealReference,
    create_filter,
    filter_candidates,
    read_reviews,
    reviews_pending,
)
from vision_si.similarity import max_similarity, pixel_vectors, unit_rows

K, DIM = 3, 16
# 8×8 digits of one class correlate up to ~0.98 with their nearest neighbour, so the pixel thresholds
# sit above that here; the embedding thresholds stay at their defaults.
# fixed thresholds here; the real-data percentiles (the defaults) are tested on their own below
CFG = FilterConfig(memorisation_pixel=0.99, leak_pixel=0.99, duplicate_pixel=0.99, fidelity_percentile=None,
                   memorisation_percentile=None, leak_percentile=None)


def _probs(label: int, p: float) -> np.ndarray:
    out = np.full(K, (1 - p) / (K - 1))
    out[label] = p
    return out


@pytest.fixture(scope="module")
def world():
    d = load_digits()
    keep = d.target < K
    x = (d.images[keep] / 16.0).astype(np.float32)[:, None]  # N×1×8×8 in [0, 1]
    y = d.target[keep].astype(np.int64)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(K, DIM)) * 1.5
    emb = (centres[y] + rng.normal(size=(len(y), DIM))).astype(np.float32)
    tr, ev, fresh = np.arange(0, 150), np.arange(150, 200), np.arange(200, 260)
    return {"x": x, "y": y, "emb": emb, "centres": centres, "tr": tr, "ev": ev, "fresh": fresh, "rng": rng}


def build(world, extra_pool: bool = False):
    """Good candidates (fresh real digits, typical embeddings) plus one planted bad candidate per kind."""
    w = world
    x, y, emb, centres, rng = w["x"], w["y"], w["emb"], w["centres"], np.random.default_rng(1)
    fresh = w["fresh"]
    c = {"ids": [], "labels": [], "images": [], "emb": [], "critic": [], "current": [], "sha": []}

    def add(cid, label, image, e, critic=0.8, current=0.6, sha=None):
        c["ids"].append(cid)
        c["labels"].append(label)
        c["images"].append(image)
        c["emb"].append(e)
        c["critic"].append(_probs(label, critic))
        c["current"].append(_probs(label, current))
        c["sha"].append(sha or f"sha-{cid}")

    def typical(label):
        return centres[label] + 0.5 * rng.normal(size=DIM)

    for i in fresh[:12]:
        add(f"syn-good-{i:03d}", int(y[i]), x[i], typical(y[i]))
    t0, t1, e0, f0 = w["tr"][3], w["tr"][7], w["ev"][5], fresh[20]
    add("syn-bad-offclass", int(y[f0]), x[f0], typical(y[f0]), critic=0.1)
    add("syn-bad-easy", int(y[fresh[21]]), x[fresh[21]], typical(y[fresh[21]]), current=0.99)
    add("syn-bad-copy", int(y[t0]), x[t0].copy(), emb[t0].copy())
    noised = np.clip(x[t1] + rng.normal(scale=0.02, size=x[t1].shape), 0, 1).astype(np.float32)
    add("syn-bad-noisedcopy", int(y[t1]), noised, typical(y[t1]))  # pixels only: fresh embedding
    add("syn-bad-embcopy", int(y[t1]), x[fresh[22]], emb[w["tr"][9]] + 0.01)  # embedding only
    add("syn-bad-leak", int(y[e0]), x[e0].copy(), emb[e0].copy(), critic=0.1)  # also off-class: leak wins
    add("syn-bad-leaksha", int(y[fresh[23]]), x[fresh[23]], typical(y[fresh[23]]), sha="sha-eval-7")
    add("syn-bad-outlier", int(y[fresh[24]]), x[fresh[24]], centres[y[fresh[24]]] + 6.0)
    dup_img, dup_emb = x[fresh[25]], typical(y[fresh[25]])
    add("syn-dup-b", int(y[fresh[25]]), dup_img.copy(), dup_emb.copy())  # listed first, but 'b' > 'a'
    add("syn-dup-a", int(y[fresh[25]]), dup_img.copy(), dup_emb.copy())
    pool_x = pool_e = None
    if extra_pool:
        pool_x, pool_e = x[fresh[30]][None], typical(y[fresh[30]])[None]
        add("syn-bad-poolcopy", int(y[fresh[30]]), x[fresh[30]].copy(), pool_e[0].copy())
    ev, tr = w["ev"], w["tr"]
    kwargs = dict(
        candidates=LabelledImages(np.stack(c["images"]), np.array(c["labels"]), c["ids"], c["sha"]),
        real_train=LabelledImages(x[tr], y[tr], [f"train-{i}" for i in tr], [f"sha-train-{i}" for i in tr]),
        evaluation=LabelledImages(x[ev], y[ev], [f"eval-{i}" for i in ev], [f"sha-eval-{i}" for i in range(len(ev))]),
        outputs=ModelOutputs(candidate_probs=np.stack(c["critic"]),
                             candidate_emb=np.stack(c["emb"]).astype(np.float32),
                             current_probs=np.stack(c["current"]), train_emb=emb[tr], eval_emb=emb[ev], pool_emb=pool_e),
        pool=LabelledImages(pool_x, y[[fresh[30]]], ["syn-pool-0"], ["sha-pool-0"]) if pool_x is not None else None,
        seed=0)
    return kwargs


EXPECTED = {"syn-bad-offclass": "off_class", "syn-bad-easy": "too_easy", "syn-bad-copy": "memorised",
            "syn-bad-noisedcopy": "memorised", "syn-bad-embcopy": "memorised", "syn-bad-leak": "leak",
            "syn-bad-leaksha": "leak", "syn-bad-outlier": "unrealistic", "syn-dup-b": "duplicate",
            "syn-bad-poolcopy": "duplicate"}


def test_each_planted_bad_candidate_is_rejected_for_its_reason_and_good_ones_pass(world):
    res = filter_candidates(CFG, **build(world, extra_pool=True))
    reasons = {r["id"]: r["reason"] for r in res.rows}
    for cid, reason in EXPECTED.items():
        assert reasons[cid] == reason, (cid, reasons[cid])
    good = [r for r in res.rows if r["id"].startswith("syn-good") or r["id"] == "syn-dup-a"]
    assert len(good) == 13 and all(r["decision"] == "accepted" for r in good), [
        (r["id"], r["failed"]) for r in good if r["decision"] != "accepted"]
    assert set(res.accepted_ids) == {r["id"] for r in good}
    assert res.counts["memorised"] == 3 and res.counts["leak"] == 2 and res.counts["duplicate"] == 2
    # every score for every candidate, and every failure listed, first one is the reason
    leak = next(r for r in res.rows if r["id"] == "syn-bad-leak")
    assert leak["failed"] == "leak;off_class"
    for col in ("fidelity", "informativeness", "realism_score", "memorisation_cosine", "memorisation_pixel",
                "leak_cosine", "leak_pixel", "duplicate_cosine"):
        assert np.isfinite(res.column(col)).all(), col


def test_closest_real_distances_are_recorded(world):
    res = filter_candidates(CFG, **build(world))
    q = res.closest_real["candidates"]["pixel_distance"]
    assert q["min"] == pytest.approx(0.0, abs=1e-5)  # the exact copy
    assert q["min"] <= q["p50"] <= q["max"]
    row = next(r for r in res.rows if r["id"] == "syn-bad-copy")
    assert row["nearest_real_pixel_index"] == 3 and row["nearest_real_cosine_index"] == 3
    assert res.closest_real["real_train"]["n_sampled"] == 150


def test_leakage_cannot_be_switched_off(world):
    cfg = dataclasses.replace(CFG, enabled=[])
    res = filter_candidates(cfg, **build(world))
    reasons = {r["id"]: r["reason"] for r in res.rows}
    assert res.enabled == ["leakage"]
    assert reasons["syn-bad-leak"] == "leak" and reasons["syn-bad-leaksha"] == "leak"
    assert all(r["decision"] == "accepted" for r in res.rows if r["reason"] != "leak")
    with pytest.raises(ConfigError, match="leakage cannot be switched off"):
        config_from_dict({"filter": {"enabled": ["fidelity", "leakage"]}})


def test_a_disabled_filter_still_scores_but_does_not_decide(world):
    cfg = dataclasses.replace(CFG, enabled=[n for n in CFG.enabled if n != "fidelity"])
    res = filter_candidates(cfg, **build(world))
    row = next(r for r in res.rows if r["id"] == "syn-bad-offclass")
    assert row["decision"] == "accepted" and row["fidelity"] == pytest.approx(0.1)


def test_reviews_override_except_a_leak(world, tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("id,verdict\nsyn-bad-offclass,accept\nsyn-good-200,reject\nsyn-bad-leak,accept\n"
                    "syn-from-another-round,reject\n")
    res = filter_candidates(CFG, **build(world), reviews=read_reviews(path))
    rows = {r["id"]: r for r in res.rows}
    assert rows["syn-bad-offclass"]["decision"] == "accepted" and rows["syn-bad-offclass"]["overridden"]
    assert rows["syn-bad-offclass"]["reason"] == "off_class"  # what the filter said stays on record
    assert rows["syn-good-200"]["decision"] == "rejected" and rows["syn-good-200"]["reason"] == "human_review"
    assert rows["syn-bad-leak"]["decision"] == "rejected" and not rows["syn-bad-leak"]["overridden"]
    assert sorted(res.overridden_ids) == ["syn-bad-offclass", "syn-good-200"]
    assert res.review_refused_ids == ["syn-bad-leak"]
    assert "syn-bad-offclass" in res.accepted_ids and "syn-good-200" not in res.accepted_ids
    assert res.counts["human_review"] == 1
    path.write_text("id,verdict\nsyn-good-200,maybe\n")
    with pytest.raises(DataError, match="line 2"):
        read_reviews(path)


def test_reviews_pending_finds_reviews_a_filter_result_does_not_reflect(world):
    plain = filter_candidates(CFG, **build(world))
    reviewed = filter_candidates(CFG, **build(world), reviews={"syn-good-200": "reject", "syn-bad-offclass": "accept"})
    later = {"syn-good-200": "reject", "syn-bad-offclass": "accept", "syn-bad-leak": "accept"}
    # written after the plain filter ran: both overrides are pending; an accept of a leak never counts
    assert sorted(reviews_pending(plain.rows, later)) == ["syn-bad-offclass", "syn-good-200"]
    assert reviews_pending(reviewed.rows, later) == []  # already applied
    assert reviews_pending(plain.rows, {"syn-bad-offclass": "reject"}) == []  # the filter rejected it anyway
    # a review withdrawn after it was applied: the filter's own decision must come back
    assert sorted(reviews_pending(reviewed.rows, None)) == ["syn-bad-offclass", "syn-good-200"]


def test_percentile_thresholds_come_from_the_real_data(world):
    w = world
    kwargs = build(world)
    rng = np.random.default_rng(5)
    val_y = w["y"][w["ev"]]
    val_p = np.stack([_probs(int(c), float(p)) for c, p in zip(val_y, rng.uniform(0.3, 1.0, len(val_y)), strict=True)])
    cfg = dataclasses.replace(CFG, fidelity_percentile=10.0, memorisation_percentile=99.0, realism_percentile=90.0)
    with pytest.raises(InputError, match="fidelity_percentile"):
        filter_candidates(cfg, **kwargs)
    kwargs["outputs"] = dataclasses.replace(kwargs["outputs"], val_probs=val_p)  # evaluation's rows are val here
    res = filter_candidates(cfg, **kwargs)
    expected = np.percentile(val_p[np.arange(len(val_y)), val_y], 10)
    assert res.thresholds["fidelity"]["threshold_"] == pytest.approx(expected)
    fid = res.column("fidelity")
    rejected = np.array([("off_class" in r["failed"]) for r in res.rows])
    assert (rejected == (fid < expected)).all()
    # realism: the class's own leave-one-out mean 5-NN distance (brute force here), its 90th percentile
    tr_y, tr_e = w["y"][w["tr"]], unit_rows(w["emb"][w["tr"]])
    for c in range(K):
        e = tr_e[tr_y == c]
        d = np.sqrt(((e[:, None] - e[None]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        own = np.sort(d, axis=1)[:, :5].mean(axis=1)
        assert res.thresholds["realism"]["per_class"][c] == pytest.approx(np.percentile(own, 90), rel=1e-4)
    # memorisation: the 99th percentile of real train's nearest-other-real pixel correlation
    pix = pixel_vectors(w["x"][w["tr"]], 8)
    sims = pix @ pix.T
    np.fill_diagonal(sims, -np.inf)
    assert res.thresholds["memorisation"]["pixel_threshold_"] == pytest.approx(
        np.percentile(sims.max(1), 99), abs=1e-5)
    # leakage with a percentile: the same real-to-real yardstick, and a copy of a test image still leaks
    leak = filter_candidates(dataclasses.replace(cfg, leak_percentile=99.0), **kwargs)
    assert leak.thresholds["leakage"]["pixel_threshold_"] == pytest.approx(np.percentile(sims.max(1), 99), abs=1e-5)
    assert leak.leak_pixel_threshold == leak.thresholds["leakage"]["pixel_threshold_"]  # the typed field
    assert next(r for r in leak.rows if r["id"] == "syn-bad-leak")["reason"] == "leak"


def test_lof_realism_rejects_the_outlier(world):
    res = filter_candidates(dataclasses.replace(CFG, realism_method="lof"), **build(world))
    reasons = {r["id"]: r["reason"] for r in res.rows}
    assert reasons["syn-bad-outlier"] == "unrealistic"
    assert sum(r["failed"].count("unrealistic") for r in res.rows if r["id"].startswith("syn-good")) == 0


def test_result_round_trips_through_the_run_directory(world, tmp_path):
    res = filter_candidates(CFG, **build(world, extra_pool=True), reviews={"syn-good-200": "reject"})
    res.save(tmp_path)
    assert (tmp_path / "scores.csv").is_file() and (tmp_path / "filter.json").is_file()
    back = FilterResult.load(tmp_path)
    assert back.accepted_ids == res.accepted_ids and back.counts == res.counts
    assert back.overridden_ids == ["syn-good-200"]
    for a, b in zip(res.rows, back.rows, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float):
                assert (np.isnan(a[k]) and np.isnan(b[k])) or a[k] == b[k], k
            else:
                assert a[k] == b[k], k


def test_filters_follow_the_sklearn_shape(world):
    assert set(FILTERS) == set(PRIORITY) == {"fidelity", "informativeness", "realism", "memorisation",
                                              "leakage", "duplicate"}
    for name in FILTERS:
        f = create_filter(name, CFG)
        with pytest.raises(NotFittedError, match=name):
            f.score(None)
    with pytest.raises(InputError, match="unknown filter"):
        create_filter("sharpness", CFG)
    real = RealReference(train_labels=np.array([0, 0, 1]), train_emb=np.eye(3, 4, dtype=np.float32),
                         train_pixels=np.eye(3, 4, dtype=np.float32), eval_emb=np.zeros((0, 4), np.float32),
                         eval_pixels=np.zeros((0, 4), np.float32))
    f = create_filter("realism", CFG)
    assert f.fit(real) is f and set(f.class_thresholds_) == {0}  # class 1 has one image: cannot judge


def test_bad_inputs_are_named(world):
    kwargs = build(world)
    cands, outputs = kwargs["candidates"], kwargs["outputs"]
    with pytest.raises(DataError, match="labels"):
        LabelledImages(cands.images, cands.labels[:-1], cands.ids, cands.sha256)
    with pytest.raises(DataError, match="outputs.candidate_probs"):
        filter_candidates(CFG, **{**kwargs, "outputs": dataclasses.replace(outputs,
                                                                           candidate_probs=outputs.candidate_probs[1:])})
    with pytest.raises(DataError, match="unique"):
        filter_candidates(CFG, **{**kwargs, "candidates": dataclasses.replace(cands, ids=["same"] * len(cands))})
    with pytest.raises(DataError, match="outputs.train_emb"):
        filter_candidates(CFG, **{**kwargs, "outputs": dataclasses.replace(outputs, train_emb=outputs.train_emb[:, :5])})
    with pytest.raises(DataError, match="pool"):
        filter_candidates(CFG, **{**kwargs, "outputs": dataclasses.replace(outputs, pool_emb=outputs.eval_emb[:1])})
    empty = filter_candidates(CFG, **{**kwargs, "candidates": cands.subset([]),
                                      "outputs": dataclasses.replace(outputs, candidate_probs=np.zeros((0, K)),
                                                                     candidate_emb=np.zeros((0, DIM)),
                                                                     current_probs=np.zeros((0, K)))})
    assert empty.accepted_ids == [] and sum(empty.counts.values()) == 0


def test_pixel_similarity_is_the_correlation_of_pooled_images():
    rng = np.random.default_rng(3)
    a = rng.uniform(size=(1, 1, 32, 32)).astype(np.float32)
    b = rng.uniform(size=(1, 1, 32, 32)).astype(np.float32)
    pa, pb = pixel_vectors(a, 16), pixel_vectors(b, 16)
    pooled = [im.reshape(16, 2, 16, 2).mean(axis=(1, 3)).ravel() for im in (a[0, 0], b[0, 0])]
    assert (pa @ pb.T).item() == pytest.approx(np.corrcoef(*pooled)[0, 1], abs=1e-5)
    brighter = pixel_vectors(0.5 * a + 0.3, 16)  # contrast and brightness change
    assert (pa @ brighter.T).item() == pytest.approx(1.0, abs=1e-5)
    assert (pixel_vectors(np.full_like(a, 0.4), 16) @ pa.T).item() == 0.0  # flat image: no pattern
    q, r = unit_rows(rng.normal(size=(50, 8))), unit_rows(rng.normal(size=(70, 8)))
    best, where = max_similarity(q, r, chunk=7)
    full = q @ r.T
    assert np.allclose(best, full.max(1), atol=1e-6) and (where == full.argmax(1)).all()


def test_a_real_classifiers_outputs_feed_filter_candidates(world, tmp_path):
    from vision_si.classifier import predict, train_classifier

    w = world
    x, y = w["x"], w["y"]
    clf = train_classifier(ClassifierConfig(arch="resnet10t", model_kwargs={"channels": [8, 16, 32, 64]}, steps=10,
                                            batch_size=16, warmup_steps=2, device="cpu", eval_every=1000),
                           x[w["tr"]], y[w["tr"]], classes=["0", "1", "2"], seed=0, out_dir=tmp_path / "critic",
                           progress=False)
    rows = [w["ev"][4], w["fresh"][40]]
    cands = LabelledImages(x[rows], y[rows], ["leak", "fresh"], ["sha-a", "sha-b"])
    on_cands, on_eval = predict(clf, cands.images), predict(clf, x[w["ev"]])
    outputs = ModelOutputs(candidate_probs=on_cands.probs, candidate_emb=on_cands.embeddings,
                           current_probs=on_cands.probs, train_emb=predict(clf, x[w["tr"]]).embeddings,
                           eval_emb=on_eval.embeddings, val_probs=on_eval.probs)
    res = filter_candidates(CFG, candidates=cands, real_train=build(world)["real_train"],
                            evaluation=build(world)["evaluation"], outputs=outputs)
    assert res.rows[0]["reason"] == "leak" and res.rows[0]["leak_cosine"] == pytest.approx(1.0, abs=1e-4)
    assert res.rows[1]["reason"] != "leak"
