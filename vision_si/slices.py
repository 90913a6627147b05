"""Weak slices: clusters of a class's real embeddings whose `val` error is reliably above the class's.

Per class, the embeddings of its real images (train and val) are L2-normalised, reduced by PCA when
wider than `pca_dim`, and clustered — a Gaussian mixture whose number of components (1 to
`max_clusters`) minimises BIC, or HDBSCAN. Clusters are fitted on at most `max_fit_samples` images
of the class and every image is then assigned, so memory and time stay bounded at any size.

"Reliably above" (the decision rule). A cluster with `n` val images, `e` of them misclassified, in
a class whose `N` val images hold `E` errors, is a weak slice when

* `n >= min_slice_size`, and its error rate `e / n` is above the class's `E / N`, and
* the one-sided exact test says the excess is no accident: if the class's `E` errors fell on its
  val images at random, at least `e` of them would land in these `n` images with probability
  `p = P(X >= e)`, X hypergeometric(N, E, n) (Fisher's exact test of the cluster against the rest
  of its class), and `p < (1 - confidence) / (2 m)`.

`m` counts every cluster tested in this diagnosis (all classes, only those with at least
`min_slice_size` val images and only in classes split into two or more clusters): a Bonferroni
correction, because with 10 classes × 5 clusters an uncorrected test calls about one cluster weak by
chance even when errors are spread uniformly. The threshold is the tail of a two-sided interval at
`confidence`, so at the default 0.95 it is 0.025 / m.

Why this and not "the lower bound of a Wilson interval above the class rate": with a handful of val
images and a rare error Wilson's lower bound is too high (a cluster of 5 with one error beats a
class rate of 1%), and comparing against a class rate treated as known ignores that the rate is
itself estimated from the same few images. The conditional test is exact at any size. For reading,
each cluster still reports its Wilson interval (`error_ci`) and the exact Clopper-Pearson lower
bound at the adjusted confidence (`decision_lower`).
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


def slice_id_for(class_index: int, cluster: int) -> str:
    return f"c{class_index}-s{cluster}"


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


@dataclass
class _Cluster:
    report: SliceReport
    p_class: float
    n_class: int  # val images of the class
    e_class: int  # of which misclassified


def find_slices(cfg: DiagnoseConfig, *, classes: list[str], val_labels: np.ndarray, val_preds: np.ndarray,
                val_margins: np.ndarray, val_embeddings: np.ndarray, val_ids: np.ndarray,
                train_labels: np.ndarray, train_embeddings: np.ndarray, train_ids: np.ndarray,
                seed: int) -> tuple[list[SliceReport], np.ndarray, np.ndarray, dict[int, list[str]]]:
    """Cluster every class, score each cluster, decide which are weak.

    Returns the slice reports, the slice id of every val and train image ("" for none/noise), and
    per class the exemplar ids for a class-level allocation (training images nearest the class's
    misclassified or lowest-margin val images outside its weak slices).
    """
    # the work here is many small fits (PCA width, k-means init of the mixtures): BLAS and OpenMP
    # threads only add synchronisation, and on a busy 2-core machine their spinning made this step
    # 3-30 times slower than one thread (benchmarks/diagnose_scale.py)
    with threadpool_limits(limits=1):
        return _find_slices(cfg, classes, val_labels, val_preds, val_margins, val_embeddings, val_ids,
                            train_labels, train_embeddings, train_ids, seed)


def _find_slices(cfg, classes, val_labels, val_preds, val_margins, val_embeddings, val_ids, train_labels,
                 train_embeddings, train_ids, seed):
    val_slice = np.full(val_labels.shape[0], "", dtype=object)
    train_slice = np.full(train_labels.shape[0], "", dtype=object)
    clusters: list[_Cluster] = []
    class_z: dict[int, tuple] = {}
    for k, name in enumerate(classes):
        vi = np.flatnonzero(val_labels == k)
        ti = np.flatnonzero(train_labels == k)
        if vi.size + ti.size == 0:
            continue
        emb = np.concatenate([train_embeddings[ti], val_embeddings[vi]]) if ti.size else val_embeddings[vi]
        z = reduce_embeddings(emb, pca_dim=cfg.pca_dim, max_fit_samples=cfg.max_fit_samples, seed=seed + k)
        del emb
        labels, centres = cluster_embeddings(z, cfg, seed + k)
        zt, zv = z[: ti.size], z[ti.size:]
        lt, lv = labels[: ti.size], labels[ti.size:]
        errors = val_preds[vi] != k
        p_class = float(errors.mean()) if vi.size else 0.0
        class_z[k] = (zt, zv, vi, ti)
        for j in sorted(set(labels.tolist()) - {NOISE}):
            sid = slice_id_for(k, j)
            in_v, in_t = lv == j, lt == j
            val_slice[vi[in_v]] = sid
            train_slice[ti[in_t]] = sid
            n_v, e = int(in_v.sum()), int((in_v & errors).sum())
            wrong = val_preds[vi[in_v & errors]]
            if wrong.size:
                counts = np.bincount(wrong, minlength=len(classes))
                dom, dom_n = classes[int(counts.argmax())], int(counts.max())
            else:
                dom, dom_n = None, 0
            margins = val_margins[vi[in_v]]
            hard = np.flatnonzero(in_v)[np.argsort(val_margins[vi[in_v]], kind="stable")][: cfg.n_exemplars]
            centre = centres[j] if j < len(centres) else zt[in_t].mean(0) if in_t.any() else None
            report = SliceReport(
                slice_id=sid, class_index=k, class_name=name, cluster=int(j), n_train=int(in_t.sum()),
                n_val=n_v, n_val_errors=e, error_rate=e / n_v if n_v else 0.0,
                error_ci=list(wilson_interval(e, n_v, cfg.confidence)), decision_lower=0.0, p_value=1.0,
                class_error_rate=p_class, mean_margin=float(margins.mean()) if n_v else None,
                dominant_wrong_class=dom, dominant_wrong_count=dom_n, weak=False,
                exemplar_ids=training_exemplars(zt, train_ids[ti], centre, zv[hard], cfg.n_exemplars),
                val_error_ids=[str(x) for x in val_ids[vi[in_v & errors]][:50]],
            )
            clusters.append(_Cluster(report, p_class, int(vi.size), int(errors.sum())))
    _decide(cfg, clusters)
    weak_ids = [c.report.slice_id for c in clusters if c.report.weak]
    class_exemplars = {}
    for k, (zt, zv, vi, ti) in class_z.items():
        outside = ~np.isin(val_slice[vi], weak_ids)
        cand = np.flatnonzero(outside) if outside.any() else np.arange(vi.size)
        hard = cand[np.argsort(val_margins[vi[cand]], kind="stable")][: cfg.n_exemplars]
        class_exemplars[k] = training_exemplars(zt, train_ids[ti], None, zv[hard], cfg.n_exemplars)
    return [c.report for c in clusters], val_slice, train_slice, class_exemplars


def _decide(cfg: DiagnoseConfig, clusters: list[_Cluster]) -> None:
    """Mark weak slices in place (rule in the module docstring)."""
    per_class: dict[int, int] = {}
    for c in clusters:
        per_class[c.report.class_index] = per_class.get(c.report.class_index, 0) + 1
    # a class's single cluster is the class itself: it cannot stand above its own rate
    tested = [c for c in clusters if c.report.n_val >= cfg.min_slice_size and per_class[c.report.class_index] > 1]
    m = max(1, len(tested))
    tail = (1 - cfg.confidence) / (2 * m)
    for c in tested:
        r = c.report
        e, n = r.n_val_errors, r.n_val
        r.decision_lower = float(stats.beta.ppf(tail, e, n - e + 1)) if e else 0.0
        # P(at least e of the class's E errors land in these n of its N val images | errors exchangeable)
        r.p_value = float(stats.hypergeom.sf(e - 1, c.n_class, c.e_class, n)) if e else 1.0
        r.weak = r.p_value < tail and r.error_rate > c.p_class
