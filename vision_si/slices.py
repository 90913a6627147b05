"""Weak slices: clusters of a class's real embeddings whose error rate is reliably above the rest of the class's.

Per class, the embeddings of its real images (train and val) are L2-normalised, reduced by PCA when
wider than `pca_dim`, and clustered — a Gaussian mixture whose number of components (1 to
`max_clusters`) minimises BIC, or HDBSCAN. Clusters are fitted on at most `max_fit_samples` images
of the class and every image is then assigned, so memory and time stay bounded at any size.

Judged images. A cluster's errors are counted on its *judged* images: its `val` images, and, when the
caller passes out-of-fold predictions for `train` (`vision_si.oof`: each from a model that never trained
on that image), its train images as well. Train predictions of the model being diagnosed are never
judged: it has fitted them.

Views. The classifier's pre-logit embeddings are one view; `extra_views` (for example a self-supervised
encoder's embeddings, `view: ssl`) are clustered and tested the same way, and every slice records which
view found it (slice ids `c<k>-s<j>` for the classifier, `<view>-c<k>-s<j>` for another).

"Reliably above" (the decision rule). A cluster with `n` judged images, `e` of them misclassified, in
a class whose `N` judged images hold `E` errors, is a weak slice when

* `n >= min_slice_size` (a floor only, 2 or more: evidence, not size, decides), its error rate `e / n`
  is above the rest of its class's `(E - e) / (N - n)`, and
* the one-sided exact test says the excess is no accident: if the class's `E` errors fell on its
  judged images at random, at least `e` of them would land in these `n` images with probability
  `p = P(X >= e)`, X hypergeometric(N, E, n) (Fisher's exact test of the cluster against the rest
  of its class), and `p < (1 - confidence) / (2 m)`.

Fisher's conditional test rejects exactly when the conditional exact interval of the odds ratio (cluster
against the rest of its class) lies above 1, so this is the "interval above the rest of the class" rule
at any size: a cluster of 3 with 3 errors in a class that errs 5% of the time is weak when the evidence
holds after the correction, and a cluster of 50 with a slight excess is not.

`m` counts every cluster tested in this diagnosis (all views and classes, only those with at least
`min_slice_size` judged images and only in classes split into two or more clusters): a Bonferroni
correction, because with 10 classes × 5 clusters an uncorrected test calls about one cluster weak by
chance even when errors are spread uniformly. The threshold is the tail of a two-sided interval at
`confidence`, so at the default 0.95 it is 0.025 / m.

Why this and not "the lower bound of a Wilson interval above the class rate": with a handful of
images and a rare error Wilson's lower bound is too high (a cluster of 5 with one error beats a
class rate of 1%), and comparing against a class rate treated as known ignores that the rate is
itself estimated from the same few images. The conditional test is exact at any size. For reading,
each cluster still reports its Wilson interval (`error_ci`) and the exact Clopper-Pearson lower
bound at the adjusted confidence (`decision_lower`).

Stability (`stability_resamples` > 0): each view is clustered and decided again on random subsamples
(`STABILITY_FRACTION` of val and of train, without replacement); a cluster's `stability` is the share of
them in which most of its drawn members lie in a weak slice again. The budget weighs a weak slice by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats
from sklearn.cluster import HDBSCAN
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

from vision_si.config import DiagnoseConfig
from vision_si.metrics import wilson_interval

NOISE = -1
CLASSIFIER_VIEW = "classifier"
STABILITY_FRACTION = 0.8  # share of the images each stability re-clustering draws


@dataclass
class SliceReport:
    """One cluster of one class. `weak` marks a weak slice (see the module docstring)."""

    slice_id: str
    class_index: int
    class_name: str
    cluster: int
    n_train: int
    n_val: int
    n_val_errors: int
    error_rate: float
    error_ci: list[float]  # Wilson, at `confidence`
    decision_lower: float  # exact (Clopper-Pearson) lower bound at the Bonferroni-adjusted confidence
    p_value: float  # one-sided, conditional on the class's errors (hypergeometric); 1.0 when untested
    class_error_rate: float
    mean_margin: float | None  # val: prob of the true class minus the best other class
    dominant_wrong_class: str | None
    dominant_wrong_count: int
    weak: bool
    exemplar_ids: list[str] = field(default_factory=list)  # real TRAINING images only
    val_error_ids: list[str] = field(default_factory=list)  # for display; never generation input
    # Fields below are optional: a diagnosis saved before they existed loads with these defaults.
    view: str = CLASSIFIER_VIEW  # whose embeddings were clustered: "classifier", or an extra view ("ssl")
    n_judged: int = 0  # images whose errors were tested: val, plus train when judged out of fold (0: = n_val)
    n_judged_errors: int = 0
    class_n_judged: int = 0  # judged images of the class
    rest_error_rate: float | None = None  # error rate of the class's other judged images
    stability: float | None = None  # share of re-clusterings on subsamples that find its members weak again
    top_confusion: str | None = None  # "true -> predicted", the most common confusion of its judged errors
    enriched_for: str | None = None  # "column=value" the slice is most enriched for (metadata, when given)
    enrichment_odds_ratio: float | None = None  # with 0.5 added to each cell, so it stays finite
    enrichment_p: float | None = None  # Fisher's exact test, one-sided (more of the value inside the slice)
    description: str = ""


def slice_id_for(class_index: int, cluster: int, view: str = CLASSIFIER_VIEW) -> str:
    """`c<class>-s<cluster>` for the classifier's view, `<view>-c<class>-s<cluster>` for another."""
    return f"c{class_index}-s{cluster}" if view == CLASSIFIER_VIEW else f"{view}-c{class_index}-s{cluster}"


def reduce_embeddings(emb: np.ndarray, *, pca_dim: int, max_fit_samples: int, seed: int,
                      chunk: int = 50_000) -> np.ndarray:
    """L2-normalise and (when wider than `pca_dim`) project onto PCA axes fitted on a subsample."""
    n, width = emb.shape
    rng = np.random.default_rng(seed)
    fit_idx = np.sort(rng.choice(n, size=min(n, max_fit_samples), replace=False))
    dim = min(pca_dim, width, max(1, fit_idx.size - 1))
    if width <= pca_dim or dim >= width:
        return _l2(np.asarray(emb, dtype=np.float32))
    pca = PCA(dim, svd_solver="randomized", random_state=seed).fit(_l2(emb[fit_idx]))
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):  # chunks keep the float copy of wide embeddings small
        out[start:start + chunk] = pca.transform(_l2(emb[start:start + chunk]))
    return out


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cluster_embeddings(z: np.ndarray, cfg: DiagnoseConfig, seed: int,
                       fit_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cluster labels for every row of `z` (NOISE for HDBSCAN outliers) and one centre per cluster.

    Clusters are fitted on (a subsample of) `fit_rows`, all rows by default, then every row is assigned.
    """
    n = z.shape[0]
    rng = np.random.default_rng(seed)
    pool = np.arange(n) if fit_rows is None else np.asarray(fit_rows)
    fit_idx = np.sort(rng.choice(pool, size=min(pool.size, cfg.max_fit_samples), replace=False))
    zf = z[fit_idx]
    if fit_idx.size < 2 * cfg.min_slice_size:
        return np.zeros(n, dtype=int), z.mean(axis=0, keepdims=True)
    if cfg.cluster_method == "gmm":
        best, best_bic = None, np.inf
        # a component needs a few points per parameter; more components than that only overfit
        for k in range(1, min(cfg.max_clusters, fit_idx.size // cfg.min_slice_size) + 1):
            gmm = GaussianMixture(k, covariance_type="diag", reg_covar=1e-5, max_iter=200,
                                  random_state=seed).fit(zf)
            bic = gmm.bic(zf)
            if bic < best_bic:
                best, best_bic = gmm, bic
        labels = np.concatenate([best.predict(z[s:s + 50_000]) for s in range(0, n, 50_000)])
        return labels, best.means_.astype(np.float32)
    min_size = max(cfg.min_slice_size, zf.shape[0] // 50)
    hdb = HDBSCAN(min_cluster_size=min_size, store_centers="centroid", copy=True).fit(zf)
    labels = np.full(n, NOISE, dtype=int)
    labels[fit_idx] = hdb.labels_
    rest = np.setdiff1d(np.arange(n), fit_idx)
    if rest.size:  # points left out of the fit join the cluster of their nearest fitted point
        for s in range(0, rest.size, 1024):
            part = rest[s:s + 1024]
            labels[part] = hdb.labels_[_nearest(z[part], zf)]
    centres = hdb.centroids_ if len(getattr(hdb, "centroids_", [])) else np.zeros((0, z.shape[1]))
    return labels, np.asarray(centres, dtype=np.float32)


def _nearest(queries: np.ndarray, points: np.ndarray, k: int = 1) -> np.ndarray:
    """Indices of the k nearest `points` (Euclidean) for each query, nearest first."""
    d = (queries ** 2).sum(1)[:, None] - 2 * queries @ points.T + (points ** 2).sum(1)[None, :]
    k = min(k, points.shape[0])
    part = np.argpartition(d, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(d, part, axis=1).argsort(axis=1)
    return np.take_along_axis(part, order, axis=1).squeeze(1) if k == 1 else np.take_along_axis(part, order, axis=1)


def training_exemplars(z_train: np.ndarray, train_ids: np.ndarray, centre: np.ndarray | None,
                       hard_queries: np.ndarray, n: int) -> list[str]:
    """Half nearest the centre, half nearest the hard (misclassified / low-margin) val images; all real train.

    Val images themselves never become exemplars: what the generator starts from must not leak
    the images that judge it.
    """
    if z_train.shape[0] == 0 or n <= 0:
        return []
    picked: list[int] = []
    n_hard = n // 2 if hard_queries.shape[0] and centre is not None else (n if hard_queries.shape[0] else 0)
    if centre is not None:
        near = _nearest(centre[None, :], z_train, k=min(z_train.shape[0], n))[0]
        picked.extend(int(i) for i in near[: n - n_hard])
    if n_hard:
        nn = _nearest(hard_queries, z_train, k=min(z_train.shape[0], n))
        for column in nn.T:  # round-robin over queries so every hard image contributes
            for i in column:
                if len(picked) >= n:
                    break
                if int(i) not in picked:
                    picked.append(int(i))
    return [str(train_ids[i]) for i in picked[:n]]


@dataclass(frozen=True)
class Rows:
    """One split's rows as the slice search reads them. `preds`/`margins` None: the split is clustered
    (its images belong to slices) but its errors are not judged (train without out-of-fold predictions)."""

    labels: np.ndarray
    ids: np.ndarray
    preds: np.ndarray | None = None
    margins: np.ndarray | None = None

    def subset(self, idx: np.ndarray) -> Rows:
        preds, margins = (None, None) if self.preds is None else (self.preds[idx], self.margins[idx])
        return Rows(self.labels[idx], self.ids[idx], preds, margins)


@dataclass
class _Cluster:
    report: SliceReport
    n_class: int  # judged images of the class
    e_class: int  # of which misclassified


@dataclass
class ViewSlices:
    """What one view's clustering found: clusters (undecided), each row's slice id, per-class geometry."""

    clusters: list[_Cluster]
    val_slice: np.ndarray
    train_slice: np.ndarray
    class_z: dict[int, tuple]


def find_slices(cfg: DiagnoseConfig, *, classes: list[str], val_labels: np.ndarray, val_preds: np.ndarray,
                val_margins: np.ndarray, val_embeddings: np.ndarray, val_ids: np.ndarray,
                train_labels: np.ndarray, train_embeddings: np.ndarray, train_ids: np.ndarray, seed: int,
                train_preds: np.ndarray | None = None, train_margins: np.ndarray | None = None,
                extra_views: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                ) -> tuple[list[SliceReport], np.ndarray, np.ndarray, dict[int, list[str]], dict[str, np.ndarray]]:
    """Cluster every class in every view, score each cluster, decide which are weak.

    With `train_preds` (out-of-fold predictions: each from a model that never trained on that image) the
    train images are judged too; otherwise only val images are. `extra_views` maps a view name to its
    (val, train) embeddings, clustered and tested the same way; one Bonferroni correction covers every
    view. Returns the slice reports, the classifier view's slice id of every val and train image ("" for
    none/noise), per class the exemplar ids for a class-level allocation (training images nearest the
    class's misclassified or lowest-margin val images outside its weak slices), and per extra view its
    slice id of every val-then-train image.
    """
    v = Rows(np.asarray(val_labels), np.asarray(val_ids, dtype=object), np.asarray(val_preds), np.asarray(val_margins))
    t = Rows(np.asarray(train_labels), np.asarray(train_ids, dtype=object),
             None if train_preds is None else np.asarray(train_preds),
             None if train_preds is None else np.asarray(train_margins))
    views = {CLASSIFIER_VIEW: (val_embeddings, train_embeddings), **(extra_views or {})}
    # the work here is many small fits (PCA width, k-means init of the mixtures): BLAS and OpenMP
    # threads only add synchronisation, and on a busy 2-core machine their spinning made this step
    # 3-30 times slower than one thread (benchmarks/diagnose_scale.py)
    with threadpool_limits(limits=1):
        found = {name: _slices_of_view(cfg, classes, name, ve, te, v, t, seed) for name, (ve, te) in views.items()}
        clusters = [c for f in found.values() for c in f.clusters]
        decide(cfg, clusters)
        if cfg.stability_resamples:
            for name, (ve, te) in views.items():
                _stability(cfg, classes, name, ve, te, v, t, seed, found[name])
    main = found[CLASSIFIER_VIEW]
    weak_ids = [c.report.slice_id for c in main.clusters if c.report.weak]
    class_exemplars = {}
    for k, (zt, zv, vi, ti) in main.class_z.items():
        outside = ~np.isin(main.val_slice[vi], weak_ids)
        cand = np.flatnonzero(outside) if outside.any() else np.arange(vi.size)
        hard = cand[np.argsort(v.margins[vi[cand]], kind="stable")][: cfg.n_exemplars]
        class_exemplars[k] = training_exemplars(zt, t.ids[ti], None, zv[hard], cfg.n_exemplars)
    per_view = {name: np.concatenate([f.val_slice, f.train_slice]) for name, f in found.items()
                if name != CLASSIFIER_VIEW}
    return [c.report for c in clusters], main.val_slice, main.train_slice, class_exemplars, per_view


def _slices_of_view(cfg: DiagnoseConfig, classes: list[str], view: str, val_embeddings: np.ndarray,
                    train_embeddings: np.ndarray, v: Rows, t: Rows, seed: int) -> ViewSlices:
    """Cluster each class of one view and count every cluster's judged images and errors (no decision yet)."""
    val_slice = np.full(v.labels.shape[0], "", dtype=object)
    train_slice = np.full(t.labels.shape[0], "", dtype=object)
    clusters: list[_Cluster] = []
    class_z: dict[int, tuple] = {}
    judge_train = t.preds is not None
    for k, name in enumerate(classes):
        vi = np.flatnonzero(v.labels == k)
        ti = np.flatnonzero(t.labels == k)
        if vi.size + ti.size == 0:
            continue
        emb = np.concatenate([train_embeddings[ti], val_embeddings[vi]]) if ti.size else val_embeddings[vi]
        z = reduce_embeddings(emb, pca_dim=cfg.pca_dim, max_fit_samples=cfg.max_fit_samples, seed=seed + k)
        del emb
        labels, centres = cluster_embeddings(z, cfg, seed + k)
        zt, zv = z[: ti.size], z[ti.size:]
        lt, lv = labels[: ti.size], labels[ti.size:]
        v_err = v.preds[vi] != k
        t_err = t.preds[ti] != k if judge_train else np.zeros(ti.size, bool)
        n_class = int(vi.size + (ti.size if judge_train else 0))
        e_class = int(v_err.sum() + t_err.sum())
        p_class = e_class / n_class if n_class else 0.0
        class_z[k] = (zt, zv, vi, ti)
        for j in sorted(set(labels.tolist()) - {NOISE}):
            sid = slice_id_for(k, j, view)
            in_v, in_t = lv == j, lt == j
            val_slice[vi[in_v]] = sid
            train_slice[ti[in_t]] = sid
            n_v, e_v = int(in_v.sum()), int((in_v & v_err).sum())
            n_j = n_v + (int(in_t.sum()) if judge_train else 0)
            e_j = e_v + int((in_t & t_err).sum())
            wrong = v.preds[vi[in_v & v_err]]
            if judge_train:
                wrong = np.concatenate([wrong, t.preds[ti[in_t & t_err]]])
            if wrong.size:
                counts = np.bincount(wrong, minlength=len(classes))
                dom, dom_n = classes[int(counts.argmax())], int(counts.max())
            else:
                dom, dom_n = None, 0
            margins = v.margins[vi[in_v]]
            hard = np.flatnonzero(in_v)[np.argsort(margins, kind="stable")][: cfg.n_exemplars]
            centre = centres[j] if j < len(centres) else zt[in_t].mean(0) if in_t.any() else None
            rest_n = n_class - n_j
            report = SliceReport(
                slice_id=sid, class_index=k, class_name=name, cluster=int(j), n_train=int(in_t.sum()),
                n_val=n_v, n_val_errors=e_v, error_rate=e_j / n_j if n_j else 0.0,
                error_ci=list(wilson_interval(e_j, n_j, cfg.confidence)), decision_lower=0.0, p_value=1.0,
                class_error_rate=p_class, mean_margin=float(margins.mean()) if n_v else None,
                dominant_wrong_class=dom, dominant_wrong_count=dom_n, weak=False,
                exemplar_ids=training_exemplars(zt, t.ids[ti], centre, zv[hard], cfg.n_exemplars),
                val_error_ids=[str(x) for x in v.ids[vi[in_v & v_err]][:50]],
                view=view, n_judged=n_j, n_judged_errors=e_j, class_n_judged=n_class,
                rest_error_rate=(e_class - e_j) / rest_n if rest_n else None,
                top_confusion=f"{name} -> {dom}" if dom is not None else None,
            )
            clusters.append(_Cluster(report, n_class, e_class))
    return ViewSlices(clusters, val_slice, train_slice, class_z)


def decide(cfg: DiagnoseConfig, clusters: list[_Cluster]) -> None:
    """Mark weak slices in place (rule in the module docstring)."""
    per_class: dict[tuple[str, int], int] = {}
    for c in clusters:
        key = (c.report.view, c.report.class_index)
        per_class[key] = per_class.get(key, 0) + 1
    # a class's single cluster is the class itself: it cannot stand above its own rate
    tested = [c for c in clusters
              if c.report.n_judged >= cfg.min_slice_size and per_class[(c.report.view, c.report.class_index)] > 1]
    m = max(1, len(tested))
    tail = (1 - cfg.confidence) / (2 * m)
    for c in tested:
        r = c.report
        e, n = r.n_judged_errors, r.n_judged
        r.decision_lower = float(stats.beta.ppf(tail, e, n - e + 1)) if e else 0.0
        # P(at least e of the class's E errors land in these n of its N judged images | errors exchangeable)
        r.p_value = float(stats.hypergeom.sf(e - 1, c.n_class, c.e_class, n)) if e else 1.0
        rest = r.rest_error_rate if r.rest_error_rate is not None else 0.0
        r.weak = r.p_value < tail and r.error_rate > rest


def _stability(cfg: DiagnoseConfig, classes: list[str], view: str, val_embeddings: np.ndarray,
               train_embeddings: np.ndarray, v: Rows, t: Rows, seed: int, found: ViewSlices) -> None:
    """Each cluster's `stability`: the share of `stability_resamples` re-clusterings, each on a random
    `STABILITY_FRACTION` of the val and train images (drawn anew, without replacement), in which most of
    its drawn members fall in a weak slice again. Every re-clustering is decided on its own (its own
    Bonferroni count), as a diagnosis on that subsample would be."""
    members = np.concatenate([found.val_slice, found.train_slice])
    n_v = v.labels.size
    hits = {c.report.slice_id: 0 for c in found.clusters}
    for b in range(cfg.stability_resamples):
        rng = np.random.default_rng([seed, 7919, b])
        vs = np.sort(rng.choice(n_v, size=max(1, round(STABILITY_FRACTION * n_v)), replace=False))
        ts = np.sort(rng.choice(t.labels.size, size=round(STABILITY_FRACTION * t.labels.size), replace=False))
        again = _slices_of_view(cfg, classes, view, val_embeddings[vs], train_embeddings[ts], v.subset(vs),
                                t.subset(ts), seed + 1000 * (b + 1))
        decide(cfg, again.clusters)
        weak = {c.report.slice_id for c in again.clusters if c.report.weak}
        weak_again = np.isin(np.concatenate([again.val_slice, again.train_slice]), list(weak))
        drawn = members[np.concatenate([vs, n_v + ts])]
        for sid in hits:
            mine = drawn == sid
            if mine.any() and weak_again[mine].mean() >= 0.5:
                hits[sid] += 1
    for c in found.clusters:
        c.report.stability = hits[c.report.slice_id] / cfg.stability_resamples
