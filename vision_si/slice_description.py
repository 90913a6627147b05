"""What a slice is: its most common confusion and the metadata value it is most enriched for.

A slice's images are compared with the rest of its class (val and train members alike: metadata
describes images, not errors). For every column and every value present in the slice, the 2 × 2 table

                      value    other values
    in the slice        a           b
    rest of class       c           d

is tested with Fisher's exact test, one-sided (the value is more common inside the slice); the value
with the smallest p-value (ties: the larger odds ratio) is the slice's `enriched_for`. The odds ratio is
reported with 0.5 added to every cell (Haldane-Anscombe), so a value found only inside the slice still
has a finite ratio; the p-value is the exact test's on the counts themselves. Empty values ("", None)
are never candidates. The p-value is that of the best of several values and columns, so it reads as a
description, not as a corrected test.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import stats

from vision_si.errors import DataError
from vision_si.slices import SliceReport

EMPTY = ("", "None", "nan")


def check_metadata(metadata: Mapping[str, np.ndarray] | None, n_rows: int) -> dict[str, np.ndarray]:
    """Metadata columns as string arrays, one value per val-then-train image; a wrong length is a DataError."""
    out = {}
    for name, column in (metadata or {}).items():
        col = np.asarray(column, dtype=object)
        if col.shape != (n_rows,):
            raise DataError(f"metadata[{name!r}]: expected {n_rows} values (val images then train images), "
                            f"got shape {col.shape}")
        out[str(name)] = np.array([str(x) for x in col], dtype=object)
    return out


def most_enriched(in_slice: np.ndarray, values: np.ndarray) -> tuple[str, float, float] | None:
    """(value, odds ratio, p) of the value most over-represented in `in_slice` among these rows, or None."""
    best = None
    inside = values[in_slice]
    for value in sorted(set(inside.tolist()) - set(EMPTY)):
        has = values == value
        a, b = int((in_slice & has).sum()), int((in_slice & ~has).sum())
        c, d = int((~in_slice & has).sum()), int((~in_slice & ~has).sum())
        p = float(stats.fisher_exact([[a, b], [c, d]], alternative="greater")[1])
        ratio = (a + 0.5) * (d + 0.5) / ((b + 0.5) * (c + 0.5))
        if best is None or (p, -ratio) < (best[2], -best[1]):
            best = (str(value), float(ratio), p)
    return best


def describe_slices(slices: list[SliceReport], *, class_index: np.ndarray, members: Mapping[str, np.ndarray],
                    metadata: Mapping[str, np.ndarray]) -> None:
    """Fill each slice's enrichment fields and `description` in place.

    `class_index` and every array of `members` (slice id per view: `"classifier"` and any extra view)
    and `metadata` are aligned with the diagnosis's val-then-train rows.
    """
    for s in slices:
        of_class = class_index == s.class_index
        in_slice = members[s.view][of_class] == s.slice_id
        if metadata and in_slice.any() and not in_slice.all():
            found = [(col, most_enriched(in_slice, values[of_class])) for col, values in metadata.items()]
            found = [(col, r) for col, r in found if r is not None]
            if found:
                col, (value, ratio, p) = min(found, key=lambda cr: (cr[1][2], -cr[1][1]))
                s.enriched_for, s.enrichment_odds_ratio, s.enrichment_p = f"{col}={value}", ratio, p
        s.description = slice_description(s)


def slice_description(s: SliceReport) -> str:
    n, e = (s.n_judged, s.n_judged_errors) if s.n_judged else (s.n_val, s.n_val_errors)
    parts = [f"{e} of {n} judged images wrong ({s.error_rate:.0%}; rest of class "
             f"{s.rest_error_rate if s.rest_error_rate is not None else s.class_error_rate:.0%})"]
    if s.top_confusion:
        parts.append(f"mostly {s.top_confusion} ({s.dominant_wrong_count} of {e} errors)")
    if s.enriched_for:
        parts.append(f"enriched for {s.enriched_for} (odds ratio {s.enrichment_odds_ratio:.1f}, "
                     f"p={s.enrichment_p:.2g})")
    if s.stability is not None:
        parts.append(f"stability {s.stability:.2f}")
    return f"[{s.view}] " + "; ".join(parts)
