"""Near-copy search between image sets: embedding cosine and pixel correlation, on plain arrays.

Both similarities reduce to a dot product of unit vectors, so one chunked matrix product serves
both (no Python loop over pairs):

- **embedding cosine**: rows of an embedding matrix scaled to unit length.
- **pixel similarity**: Pearson correlation (normalised cross-correlation at zero shift) of the
  images after area-averaging them to `size × size` (channels kept). The mean of each image is
  removed and the rest scaled to unit length, so the value is in [-1, 1], unchanged by a global
  brightness or contrast shift (a generator's copy is often slightly off in intensity), and the
  averaging damps pixel noise and sub-pixel shifts. Adding independent noise of variance σ² to an
  image whose pixels vary with variance s² gives a correlation of about 1/sqrt(1 + σ²/s²): 0.95
  means the noise carries at most ~10 % of the image's variance, 0.98 about 4 %. A flat image has
  no pattern to correlate: its vector is zero and its similarity to anything is 0 (the sha256 and
  embedding checks still see exact copies of it).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.neighbors import NearestNeighbors

from vision_si.data.arrays import check_images
from vision_si.errors import DataError

_EPS = 1e-8
_BLOCK = 1 << 24  # similarities computed per block (float32: 64 MB)
_FLAT_STD = 1e-4  # intensity units ([0, 1] images): below this an image counts as flat


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); an all-zero row stays zero."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise DataError(f"expected a 2-D array (N × features), got shape {x.shape}")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(norm > _EPS, x / np.maximum(norm, _EPS), 0.0).astype(np.float32)


def pixel_vectors(images: np.ndarray, size: int = 16, *, gray: bool = False, chunk: int = 4096) -> np.ndarray:
    """Unit vectors whose dot product is the Pearson correlation of the `size`-pooled images."""
    x, _ = check_images(np.asarray(images), "images", unit_range=False)
    n = x.shape[0]
    c = 1 if gray else x.shape[1]
    out = np.zeros((n, c * size * size), np.float32)
    for start in range(0, n, chunk):
        t = torch.from_numpy(np.ascontiguousarray(x[start:start + chunk]))
        if gray:
            t = t.mean(dim=1, keepdim=True)
        pooled = F.adaptive_avg_pool2d(t, size).reshape(t.shape[0], -1).numpy()
        centred = pooled - pooled.mean(axis=1, keepdims=True)
        # Rounding leaves a flat image a tiny residue that unit scaling would blow up into a pattern.
        centred[centred.std(axis=1) < _FLAT_STD] = 0.0
        out[start:start + chunk] = unit_rows(centred)
    return out


def max_similarity(queries: np.ndarray, refs: np.ndarray, *, chunk: int | None = None,
                   exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each unit-vector query, the largest dot product with any ref and that ref's index.

    `exclude[i]` (optional) is a ref index that query i must not match (its own row, for
    leave-one-out). With no refs the similarity is NaN and the index -1: nothing to be a copy of.
    """
    q = np.asarray(queries, np.float32)
    r = np.asarray(refs, np.float32)
    best = np.full(q.shape[0], np.nan, np.float32)
    where = np.full(q.shape[0], -1, np.int64)
    if r.shape[0] == 0 or q.shape[0] == 0:
        return best, where
    if q.shape[1] != r.shape[1]:
        raise DataError(f"cannot compare vectors of {q.shape[1]} and {r.shape[1]} features")
    if chunk is None:  # keep each block of similarities near 64 MB whatever the number of refs
        chunk = max(1, min(4096, _BLOCK // r.shape[0]))
    for start in range(0, q.shape[0], chunk):
        sims = q[start:start + chunk] @ r.T
        if exclude is not None:
            rows = np.arange(sims.shape[0])
            own = exclude[start:start + chunk]
            ok = own >= 0
            sims[rows[ok], own[ok]] = -np.inf
        idx = sims.argmax(axis=1)
        best[start:start + chunk] = sims[np.arange(sims.shape[0]), idx]
        where[start:start + chunk] = idx
    alone = ~np.isfinite(best)  # every ref excluded: nothing left to compare with
    best[alone], where[alone] = np.nan, -1
    return best, where


def near_copy_pairs(vectors: np.ndarray, threshold: float) -> list[np.ndarray]:
    """For each unit vector, the indices of the others with dot product ≥ `threshold`.

    On unit vectors, dot ≥ t is Euclidean distance ≤ sqrt(2 − 2t), so sklearn's radius search
    finds the pairs without forming the full similarity matrix.
    """
    v = np.asarray(vectors, np.float32)
    if v.shape[0] < 2:
        return [np.zeros(0, np.int64) for _ in range(v.shape[0])]
    radius = float(np.sqrt(max(2.0 - 2.0 * threshold, 0.0))) + 1e-6
    nn = NearestNeighbors(radius=radius).fit(v)
    neighbours = nn.radius_neighbors(v, return_distance=False)
    # A zero vector (flat image) sits at distance 0 from every other zero vector but has no
    # pattern: it is not a near-copy of anything by this measure.
    flat = np.linalg.norm(v, axis=1) < 0.5
    out = []
    for i, nb in enumerate(neighbours):
        nb = nb[nb != i]
        out.append(np.zeros(0, np.int64) if flat[i] else nb[~flat[nb]].astype(np.int64))
    return out


def greedy_unique(order: np.ndarray, neighbour_lists: list[list[np.ndarray]],
                  blocked: np.ndarray | None = None) -> np.ndarray:
    """Keep items in `order`, dropping each one that is a neighbour (in any list) of one already kept.

    A `blocked` item is never kept (it duplicates something outside the set) and so never blocks others.
    """
    kept = np.zeros(len(order), bool)
    for i in order:
        if blocked is not None and blocked[i]:
            continue
        if not any(kept[nb[i]].any() for nb in neighbour_lists):
            kept[i] = True
    return kept
