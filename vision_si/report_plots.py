"""The report's diagnosis plots (matplotlib): confusion, recall with CIs, embedding map, exemplar grids.

They sit beside the report (`report.py`, `report_html.py`): the run draws them into each diagnosis
folder when the diagnosis is made (`stages.Stages.diagnose`), and `report.html` embeds them.

Every function writes one PNG and returns its path; `write_diagnosis_plots` writes them all into a
diagnosis folder. Images arrive as C×H×W float arrays in [0, 1]. Figures are built with
`matplotlib.figure.Figure`, not pyplot: no global backend is chosen on import (notebooks keep their
inline plots) and no figure is left open in pyplot's registry.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from scipy.spatial import ConvexHull, QhullError
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from vision_si.errors import DataError

if TYPE_CHECKING:
    from vision_si.diagnose import Diagnosis

ImageSource = Callable[[str], np.ndarray] | Mapping[str, np.ndarray]


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_confusion(diag: Diagnosis, path: Path) -> Path:
    cm = np.asarray(diag.confusion, dtype=float)
    k = cm.shape[0]
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(4.0, 0.45 * k + 2)
    fig = Figure(figsize=(2 * size + 1, size), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, mat, title, fmt in ((axes[0], cm, "counts", "{:.0f}"), (axes[1], rows, "row-normalised (recall)", "{:.2f}")):
        im = ax.imshow(mat, cmap="Blues", vmin=0)
        ax.set(title=title, xlabel="predicted", ylabel="true", xticks=range(k), yticks=range(k))
        ax.set_xticklabels(diag.classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticklabels(diag.classes, fontsize=8)
        if k <= 20:
            top = mat.max() or 1
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, fmt.format(mat[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if mat[i, j] > 0.6 * top else "black")
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_recall(diag: Diagnosis, path: Path) -> Path:
    k = len(diag.classes)
    rec = np.array([c.recall for c in diag.per_class])
    ci = np.array([c.recall_ci for c in diag.per_class])
    weak = np.array([c.weak for c in diag.per_class])
    fig = Figure(figsize=(max(5.0, 0.5 * k + 2), 4))
    ax = fig.subplots()
    ax.bar(range(k), rec, color=np.where(weak, "tab:red", "tab:blue"),
           yerr=np.vstack([rec - ci[:, 0], ci[:, 1] - rec]), capsize=3)
    ax.axhline(diag.overall["balanced_accuracy"]["value"], color="gray", ls="--", lw=1, label="balanced accuracy")
    ax.set(ylim=(0, 1.05), ylabel="val recall (95% Wilson CI)", title="per-class recall (red: weak class)",
           xticks=range(k))
    ax.set_xticklabels(diag.classes, rotation=60, ha="right", fontsize=8)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def project_2d(x: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, str]:
    """2-D coordinates by UMAP (when installed and asked for or `auto`), t-SNE or PCA."""
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if method in ("auto", "umap") and importlib.util.find_spec("umap") is not None and x.shape[0] > 10:
        import umap

        return umap.UMAP(n_components=2, random_state=seed, n_jobs=1).fit_transform(x), "UMAP"
    if method == "tsne" and x.shape[0] > 5:
        perplexity = float(min(30, (x.shape[0] - 1) / 3))
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x), "t-SNE"
    return PCA(2, random_state=seed).fit_transform(x), "PCA"


def plot_embedding_map(diag: Diagnosis, path: Path, *, val_embeddings: np.ndarray, val_labels: np.ndarray,
                       val_probs: np.ndarray | None = None, method: str = "auto", max_points: int = 4000,
                       seed: int = 0) -> Path:
    """Val images in 2-D coloured by class; weak slices outlined (convex hull), errors marked ×."""
    n = diag.n_val
    if val_embeddings.shape[0] != n or np.asarray(val_labels).shape[0] != n:
        raise DataError(f"embedding map: diagnosis has {n} val images, got {val_embeddings.shape[0]} embeddings "
                        f"and {np.asarray(val_labels).shape[0]} labels")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=min(n, max_points), replace=False))
    xy, name = project_2d(np.asarray(val_embeddings[idx], dtype=np.float32), method, seed)
    labels = np.asarray(val_labels)[idx]
    val_mask = diag.members.get("split", np.array([])) == "val"
    slice_of = diag.members["slice_id"][val_mask][idx] if val_mask.any() else np.full(idx.size, "", dtype=object)
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["tab10" if len(diag.classes) <= 10 else "tab20"]
    for k, cname in enumerate(diag.classes):
        m = labels == k
        ax.scatter(xy[m, 0], xy[m, 1], s=6, color=cmap(k % cmap.N), alpha=0.6, label=cname, linewidths=0)
    if val_probs is not None:
        wrong = np.asarray(val_probs)[idx].argmax(1) != labels
        ax.scatter(xy[wrong, 0], xy[wrong, 1], s=14, marker="x", color="black", lw=0.6, label="misclassified")
    for s in diag.weak_slices:
        pts = xy[slice_of == s.slice_id]
        if len(pts) >= 3:
            try:
                hull = ConvexHull(pts)
            except QhullError:  # collinear points have no hull
                continue
            ring = np.append(hull.vertices, hull.vertices[0])
            ax.plot(pts[ring, 0], pts[ring, 1], color=cmap(s.class_index % cmap.N), lw=1.5, ls="--")
            ax.annotate(f"{s.slice_id} ({s.error_rate:.0%} err)", pts.mean(0), fontsize=8, weight="bold")
    ax.set(title=f"val embeddings ({name}); dashed: weak slices", xticks=[], yticks=[])
    ax.legend(fontsize=7, markerscale=2, loc="best")
    return _save(fig, path)


def _image(source: ImageSource, image_id: str) -> np.ndarray | None:
    img = source.get(image_id) if isinstance(source, Mapping) else source(image_id)
    if img is None:
        return None
    img = np.asarray(img, dtype=np.float32)
    if img.ndim == 3 and img.shape[0] in (1, 3):  # C×H×W → H×W×C
        img = img.transpose(1, 2, 0)
    return np.clip(img.squeeze(-1) if img.ndim == 3 and img.shape[-1] == 1 else img, 0, 1)


def plot_exemplar_grid(slice_report: Any, path: Path, images_by_id: ImageSource, max_cols: int = 8) -> Path:
    """Top row: training exemplars (what the generator starts from); bottom: misclassified val members."""
    rows = [("train exemplars", list(slice_report.exemplar_ids)[:max_cols]),
            ("val errors (not used)", list(slice_report.val_error_ids)[:max_cols])]
    rows = [r for r in rows if r[1]] or [("no images", [])]
    cols = max(1, max(len(r[1]) for r in rows))
    fig = Figure(figsize=(1.3 * cols + 0.5, 1.5 * len(rows) + 0.4))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (title, ids) in enumerate(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(ids):
                img = _image(images_by_id, ids[c])
                if img is not None:
                    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
                ax.set_title(ids[c][-12:], fontsize=6)
        axes[r, 0].text(-0.1, 0.5, title, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=7)
    fig.suptitle(f"{slice_report.slice_id} ({slice_report.class_name}): val error {slice_report.error_rate:.0%} "
                 f"of {slice_report.n_val}, mostly → {slice_report.dominant_wrong_class}", fontsize=8)
    return _save(fig, path)


def write_diagnosis_plots(diag: Diagnosis, out_dir: str | Path, *, val_embeddings: np.ndarray | None = None,
                          val_labels: np.ndarray | None = None, val_probs: np.ndarray | None = None,
                          images_by_id: ImageSource | None = None, seed: int = 0) -> list[Path]:
    """confusion.png, recall.png, embedding_map.png (with embeddings) and slices/<slice_id>.png (with images)."""
    out = Path(out_dir)
    paths = [plot_confusion(diag, out / "confusion.png"), plot_recall(diag, out / "recall.png")]
    if val_embeddings is not None and val_labels is not None:
        paths.append(plot_embedding_map(diag, out / "embedding_map.png", val_embeddings=val_embeddings,
                                        val_labels=val_labels, val_probs=val_probs,
                                        method=str(diag.config.get("embedding_map", "auto")), seed=seed))
    if images_by_id is not None:
        for s in diag.weak_slices:
            paths.append(plot_exemplar_grid(s, out / "slices" / f"{s.slice_id}.png", images_by_id))
    return paths
