"""vision_si: active synthesis for data-scarce image classification.

A timm classifier finds where it is weak, a diffusion generator makes images aimed at those
weaknesses, and an independent filter plus a gate on real held-out data decide which images may
join retraining.

The names in `__all__` are the stable import surface (`from vision_si import run_loop`); see
`docs/api.md`. Everything but the configuration and the errors is imported on first use, so
`import vision_si` stays light (no torch) and never reaches the network.
"""

import os

# albumentations checks PyPI for a newer release on import unless told not to; we never reach the
# network unasked, so this must be set before anything imports albumentations.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# torch's CPU kernels run on GNU OpenMP, whose idle threads spin before they sleep. On a machine shared
# with other jobs a spinning thread burns the core another thread is waiting for, and a training step
# gets several times slower (benchmarks/threads.py). Passive waiting costs little alone and removes
# that. libgomp reads this once, when torch loads it: it takes effect when vision_si is imported first
# (the CLI always does); a user's own setting is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib  # noqa: E402
from typing import Any  # noqa: E402

from vision_si.config import RunConfig, load_config, save_config  # noqa: E402
from vision_si.errors import ConfigError, DataError, InputError, RunDirError  # noqa: E402

__version__ = "0.1.0"

# name → module it lives in. The stage function `diagnose` is not here on purpose: once the
# submodule `vision_si.diagnose` is imported, the package attribute of that name is the module,
# so `from vision_si import diagnose` could not reliably give the function.
_LAZY = {
    "run_loop": "vision_si.loop",
    "resume": "vision_si.loop",
    "write_report": "vision_si.report",
    "SampleTable": "vision_si.data",
    "load_source": "vision_si.data",
    "make_splits": "vision_si.data",
    "load_images": "vision_si.data",
    "build_augmentation": "vision_si.data",
    "LabelledImages": "vision_si.data",
    "load_real_data": "vision_si.data",
    "TrainedClassifier": "vision_si.classifier",
    "train_classifier": "vision_si.classifier",
    "predict": "vision_si.classifier",
    "load_classifier": "vision_si.classifier",
    "Diagnosis": "vision_si.diagnose",
    "GenerationRequest": "vision_si.generators",
    "run_generation": "vision_si.generators.runner",
    "read_manifest": "vision_si.generators.runner",
    "FilterResult": "vision_si.filter",
    "ModelOutputs": "vision_si.filter",
    "filter_candidates": "vision_si.filter",
    "GateDecision": "vision_si.gate",
    "run_gate": "vision_si.gate",
}

__all__ = [
    "__version__",
    "RunConfig", "load_config", "save_config",
    "InputError", "ConfigError", "DataError", "RunDirError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vision_si' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
