"""Human reviews (`reviews.csv`: id, accept|reject) and how they override the filters' decisions.

A rejected candidate a human accepts is accepted (its reason kept, `overridden` true), an accepted
one a human rejects is rejected with reason `human_review`; a `leak` is never overridden.
`reviews_pending` finds reviews a finished filter stage does not reflect yet (written afterwards, for
example on `vsi review`'s page): the loop then filters that round again, as long as its gate has not run.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vision_si.errors import DataError
from vision_si.filter.base import HUMAN_REJECT, REASONS


def read_reviews(path: str | Path) -> dict[str, str] | None:
    """`reviews.csv` with columns id, verdict (accept|reject); None when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    out: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for n, row in enumerate(csv.DictReader(text.splitlines()), start=2):
        verdict = (row.get("verdict") or "").strip().lower()
        if not (row.get("id") or "").strip() or verdict not in ("accept", "reject"):
            raise DataError(f"{path}: line {n} needs an id and a verdict of 'accept' or 'reject', got {row}")
        out[row["id"].strip()] = verdict
    return out


def reviews_pending(rows: list[dict[str, Any]], reviews: Mapping[str, str] | None) -> list[str]:
    """Ids among a filter result's `rows` whose decision does not reflect `reviews`: a reject of an accepted
    candidate, an accept of a rejected one (never a leak), or an override whose review was withdrawn."""
    reviews = reviews or {}
    pending = []
    for r in rows:
        verdict = reviews.get(r["id"])
        if verdict is None:
            stale = bool(r.get("overridden"))
        elif verdict == "reject":
            stale = r["decision"] == "accepted"
        else:
            stale = r["decision"] == "rejected" and r["reason"] != REASONS["leakage"]
        if stale:
            pending.append(r["id"])
    return pending


def _apply_reviews(rows: list[dict[str, Any]], reviews: Mapping[str, str]) -> tuple[list[str], list[str]]:
    for key, verdict in reviews.items():
        if verdict not in ("accept", "reject"):
            raise DataError(f"reviews: verdict for '{key}' is {verdict!r}; allowed: accept, reject")
    overridden, refused = [], []
    for r in rows:
        verdict = reviews.get(r["id"])
        if verdict is None:
            continue
        if verdict == "accept" and r["decision"] == "rejected":
            if r["reason"] == REASONS["leakage"]:
                refused.append(r["id"])  # an evaluation image in training would void every later measurement
                continue
            r["decision"], r["overridden"] = "accepted", True
            overridden.append(r["id"])
        elif verdict == "reject" and r["decision"] == "accepted":
            r["decision"], r["reason"], r["overridden"] = "rejected", HUMAN_REJECT, True
            overridden.append(r["id"])
    return overridden, refused
