"""The evaluation invariants of a run: synthetic images never reach `val`/`test`, and `test` is read once.

Each violation is an `EvaluationInvariantError` (the CLI's exit 3) naming what was found:

- a synthetic id or sha256 among the val/test images (`no_synthetic_in_eval`), checked before
  every training, the gate and the final evaluation;
- a row of `splits.csv` that is a synthetic image by id or sha256 (`splits_are_real`; the file's
  digest is checked before that, by `rundir.check_splits_record`);
- a synthetic image whose pixel correlation with a val/test image reaches the leak threshold the
  leakage filter applied to it (`no_near_copies`), before the gate and the final evaluation;
- `test` evaluated with other models than the ones it was evaluated with (`record_test_evaluation`).

Every read of `test` pixels goes through `test_pixels(purpose)` and is recorded in `events.jsonl`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vision_si.data.real import RealData
from vision_si.data.splits import read_splits_csv
from vision_si.errors import EvaluationInvariantError
from vision_si.generators.runner import read_manifest
from vision_si.rundir import EventLog
from vision_si.similarity import max_similarity, pixel_vectors


def splits_are_real(path: Path) -> None:
    """A run's `splits.csv` lists real images only: a row with the id or sha256 of one of the run's synthetic
    images (or a `syn-` id) stops the run. Given to `load_real_data` as its `check_split`."""
    path = Path(path)
    syn_ids, syn_sha = set(), set()
    for manifest in sorted(path.parent.glob("round-*/generate*/manifest.jsonl")):
        for row in read_manifest(manifest):
            syn_ids.add(row.id)
            syn_sha.add(row.sha256)
    for row in read_splits_csv(path):
        if row["id"] in syn_ids or row["id"].startswith("syn-") or row["sha256"] in syn_sha:
            raise EvaluationInvariantError(
                f"{path}: row '{row['id']}' (split {row['split']}) is a synthetic image (by id or sha256); "
                "splits.csv must list real images only; the run is stopped")


class Invariants:
    """The checks of one run over its real data; `events` records the reads of `test`."""

    def __init__(self, run_dir: Path, data: RealData, events: EventLog, pixel_size: int) -> None:
        self.run_dir, self.data, self.events = Path(run_dir), data, events
        self.pixel_size = pixel_size  # the leakage filter's comparison size (filter.pixel_size)

    def test_pixels(self, purpose: str) -> np.ndarray:
        """`test` pixels for `purpose`, the read recorded (leak checks compare pixels, never labels)."""
        self.events.write("test_pixels_read", purpose=purpose)
        return self.data.pixels("test")

    def no_synthetic_in_eval(self, synthetic_ids: Sequence[str], synthetic_sha256: Sequence[str] = ()) -> int:
        """Count synthetic images found in `val`/`test` by id or sha256; any is fatal."""
        eval_ids = set(self.data.ids("val")) | set(self.data.ids("test"))
        eval_sha = set(self.data.sha256("val")) | set(self.data.sha256("test"))
        bad = sum(1 for i in synthetic_ids if i in eval_ids) + sum(1 for h in synthetic_sha256 if h in eval_sha)
        if bad:
            raise EvaluationInvariantError(
                f"{bad} synthetic image(s) found in the val/test splits of {self.run_dir}; the run is stopped")
        return bad

    def no_near_copies(self, images: np.ndarray, ids: Sequence[str], thresholds: Sequence[float]) -> None:
        """No synthetic image about to count in an evaluation is a near-copy (pixels) of a val/test image.

        Each image is held to the leak threshold the leakage filter applied to it (fixed, or
        calibrated on the real data), so the check catches what slipped past or was tampered with.
        """
        if not len(images):
            return
        eval_x = np.concatenate([self.data.pixels("val"), self.test_pixels("invariant check")])
        size = min(self.pixel_size, eval_x.shape[-1])  # as the leakage filter compares
        sims, where = max_similarity(pixel_vectors(images, size), pixel_vectors(eval_x, size))
        limit = np.asarray(thresholds, dtype=np.float64)
        bad = np.flatnonzero(sims >= limit)
        if len(bad):
            eval_ids = self.data.ids("val") + self.data.ids("test")
            i = int(bad[0])
            raise EvaluationInvariantError(
                f"synthetic image '{ids[i]}' is a near-copy of evaluation image '{eval_ids[where[i]]}' "
                f"(pixel correlation {sims[i]:.4f} >= the leak threshold {limit[i]:.4f}) "
                f"in {self.run_dir}; the run is stopped")

    def record_test_evaluation(self, checkpoints: list[str]) -> None:
        """`test` is evaluated once: a kill during `final` may redo it with the same checkpoints, never others."""
        earlier = [e for e in self.events.read() if e.get("event") == "test_evaluated"]
        if any(e.get("checkpoints") != checkpoints for e in earlier):
            raise EvaluationInvariantError(f"`test` of {self.run_dir} was already evaluated once, with other models; "
                                           "refusing again")
        if not earlier:
            self.events.write("test_evaluated", models=["baseline", "final"], checkpoints=checkpoints)
