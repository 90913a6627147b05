"""The gate: synthetic images join training only with proof on real images that chose nothing.

- `statistics`: calibration, paired metrics, the seed-level interval and the sequential design,
  on plain arrays.
- `decision`: `decide` (the rule, fixed before the round) and the typed `GateDecision`.
- `training`: `run_gate`, the paired trainings look by look (local or Ray).

`from vision_si.gate import run_gate, decide, GateDecision`.
"""

from vision_si.gate.decision import Estimate, GateDecision, Look, SidePredictions, decide, outcome
from vision_si.gate.statistics import Calibration, fit_calibration, paired_interval, sequential_levels
from vision_si.gate.training import finetune_config, run_gate

__all__ = [
    "GateDecision", "Estimate", "Look", "SidePredictions", "decide", "outcome", "run_gate", "finetune_config",
    "Calibration", "fit_calibration", "paired_interval", "sequential_levels",
]
