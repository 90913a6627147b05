"""The typed record of each synthetic round, and `summary.json`: one reader for the report and the summary.

`read_rounds(run_dir)` reads every round's stage results with their own readers (`read_manifest`,
`FilterResult.load`, `GateDecision.load`) into a `RoundRecord`; `write_summary` and the report
(`vision_si.report`) both read rounds only through it, so the two cannot disagree. With
`strict=False` (the report, which must render a crashed or damaged run) a result that cannot be
read is None and the reason is kept in `RoundRecord.unreadable`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vision_si.config import RunConfig
from vision_si.data.real import RealData
from vision_si.errors import InputError
from vision_si.filter import FilterResult
from vision_si.gate import GateDecision
from vision_si.generators import ManifestRow
from vision_si.generators.runner import read_manifest
from vision_si.rundir import EventLog, atomic_write_json, read_json

TEST_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "accuracy_ci", "balanced_accuracy_ci", "macro_f1_ci",
             "per_class", "confusion")


@dataclass
class RoundRecord:
    """What a synthetic round produced, as typed results (None: the stage has not completed, or with
    `strict=False` could not be read)."""

    round: int
    manifest: list[ManifestRow] | None
    filter: FilterResult | None = None
    gate: GateDecision | None = None
    unreadable: dict[str, str] = field(default_factory=dict)  # stage → why its result could not be read

    def summary(self) -> dict[str, Any]:
        """The round's entry in summary.json."""
        entry: dict[str, Any] = {"round": self.round, "generated": len(self.manifest or [])}
        if self.filter is not None:
            entry["accepted_by_filter"] = len(self.filter.accepted_ids)
            entry["rejected_by_filter"] = self.filter.rejected_counts()
        if self.gate is not None:
            entry["gate"] = self.gate.summary()
        return entry


def _read(stage: str, read: Any, folder: Path, strict: bool, unreadable: dict[str, str]) -> Any:
    if not folder.is_dir():
        return None
    try:
        return read(folder)
    except (InputError, TypeError, ValueError, KeyError) as exc:  # damaged, cut by a crash, or foreign
        if strict:
            raise
        unreadable[stage] = f"{type(exc).__name__}: {exc}"
        return None


def read_round(run_dir: Path, r: int, *, strict: bool = True) -> RoundRecord | None:
    """Round `r`'s record, or None when its generation has not completed."""
    tag = Path(run_dir) / f"round-{r:02d}"
    if not (tag / "generate").is_dir():
        return None
    unreadable: dict[str, str] = {}
    manifest = _read("generate", lambda d: read_manifest(d / "manifest.jsonl"), tag / "generate", strict, unreadable)
    return RoundRecord(round=r, manifest=manifest,
                       filter=_read("filter", FilterResult.load, tag / "filter", strict, unreadable),
                       gate=_read("gate", GateDecision.load, tag / "gate", strict, unreadable),
                       unreadable=unreadable)


def read_rounds(run_dir: Path, *, strict: bool = True) -> list[RoundRecord]:
    """Every synthetic round whose generation completed, in order."""
    numbers = sorted(int(p.name[6:]) for p in Path(run_dir).glob("round-[0-9][0-9]") if p.is_dir())
    return [rec for r in numbers if r > 0 and (rec := read_round(run_dir, r, strict=strict)) is not None]


def write_summary(run_dir: Path, cfg: RunConfig, data: RealData) -> dict[str, Any]:
    """summary.json (docs/internals.md) from the run's typed results and `final/test.json`."""
    run_dir = Path(run_dir)
    per_class = {c: {s: int((data.labels(s) == k).sum()) for s in ("train", "val", "test")}
                 for k, c in enumerate(data.classes)}
    test = read_json(run_dir / "final" / "test.json")
    summary = {
        "dataset": {"name": cfg.data.source, "n_images": len(data.table), "skipped_images": len(data.table.skipped),
                    "splits": data.counts(), "per_class": per_class},
        "classes": data.classes,
        "rounds": [rec.summary() for rec in read_rounds(run_dir)],
        "test": {**{side: {k: test[side][k] for k in TEST_KEYS if k in test[side]} for side in ("baseline", "final")},
                 "ci_method": test.get("ci_method"),
                 # the last accepted round's paired gate models on test: the pool's effect, over seeds
                 **({"synthetic_effect": test["synthetic_effect"]} if "synthetic_effect" in test else {})},
        "timings_s": EventLog(run_dir).timings(),
        "synthetic_in_eval_splits": int(test.get("synthetic_in_eval_splits", 0)),
    }
    atomic_write_json(run_dir / "summary.json", summary)
    return summary
