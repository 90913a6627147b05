"""`FilterResult`: the per-candidate table and its summary, saved as `scores.csv` and `filter.json`."""

from __future__ import annotations

import csv
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from vision_si.errors import RunDirError
from vision_si.filter.base import PRIORITY, REASONS

ACCEPTED, REJECTED = "accepted", "rejected"  # the two values of a row's `decision`


def _column_kind(name: str) -> str:
    if name in ("id", "failed", "decision", "reason"):
        return "str"
    if name == "overridden":
        return "bool"
    if name == "class" or name.endswith("_index") or name == "leak_sha256":
        return "int"
    return "float"


@dataclass
class FilterResult:
    """The per-candidate table and its summary; `save` writes `scores.csv` and `filter.json`."""

    rows: list[dict[str, Any]]
    accepted_ids: list[str]
    counts: dict[str, int]  # rejected candidates per reason (every reason listed)
    thresholds: dict[str, dict[str, Any]]  # per filter, the thresholds actually used
    enabled: list[str]  # filters that took part in the decision (leakage always)
    # the pixel correlation at or above which the leakage filter called a candidate a copy of a val/test
    # image (fixed or calibrated); the loop holds every pooled image to the threshold it passed
    leak_pixel_threshold: float
    overridden_ids: list[str] = field(default_factory=list)
    review_refused_ids: list[str] = field(default_factory=list)  # human 'accept' on a leak: refused
    closest_real: dict[str, Any] = field(default_factory=dict)
    priority: list[str] = field(default_factory=lambda: [REASONS[n] for n in PRIORITY])
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return list(self.rows[0]) if self.rows else ["id", "class", "decision", "reason", "failed", "overridden"]

    def column(self, name: str) -> np.ndarray:
        return np.asarray([r[name] for r in self.rows])

    def rejected_counts(self) -> dict[str, int]:
        return dict(self.counts)

    @staticmethod
    def is_accepted(row: dict[str, Any]) -> bool:
        """Whether a row of `rows` was accepted (after any human review)."""
        return row["decision"] == ACCEPTED

    def reason_of(self, candidate_id: str) -> str:
        for r in self.rows:
            if r["id"] == candidate_id:
                return r["reason"]
        raise KeyError(candidate_id)

    def save(self, out_dir: str | Path) -> None:
        from vision_si.rundir import atomic_write_json, atomic_write_text

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cols = self.columns
        lines = [",".join(cols)]
        for r in self.rows:
            lines.append(",".join(_csv_cell(r[c]) for c in cols))
        atomic_write_text(out / "scores.csv", "\n".join(lines) + "\n")
        meta = {k: v for k, v in self.__dict__.items() if k != "rows"}
        meta["n_candidates"] = len(self.rows)
        meta["columns"] = {c: _column_kind(c) for c in cols}
        atomic_write_json(out / "filter.json", meta)

    @classmethod
    def load(cls, out_dir: str | Path) -> FilterResult:
        from vision_si.rundir import read_json

        out = Path(out_dir)
        meta = read_json(out / "filter.json")
        missing = [f.name for f in fields(cls) if f.name != "rows" and f.default is MISSING
                   and f.default_factory is MISSING and f.name not in meta]
        if missing or "columns" not in meta:
            raise RunDirError(f"'{out / 'filter.json'}' lacks {', '.join(missing) or 'columns'}: it was written by "
                              "another version of vision_si or edited; delete the round's filter folder to redo it")
        kinds = meta.pop("columns")
        meta.pop("n_candidates", None)
        path = out / "scores.csv"
        if not path.is_file():
            raise RunDirError(f"'{path}' is missing")
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [{k: _parse_cell(v, kinds.get(k, "str")) for k, v in row.items()} for row in csv.DictReader(fh)]
        return cls(rows=rows, **meta)


def _csv_cell(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (float, np.floating)):
        return "" if np.isnan(v) else repr(float(v))
    text = str(v)
    return f'"{text}"' if any(ch in text for ch in ',"\n') else text


def _parse_cell(v: str, kind: str) -> Any:
    if kind == "float":
        return float(v) if v != "" else float("nan")
    if kind == "int":
        return int(v)
    if kind == "bool":
        return v == "true"
    return v
