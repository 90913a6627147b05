"""vision_si: active synthesis for data-scarce image classification.

A timm classifier finds where it is weak, a diffusion generator makes images aimed at those
weaknesses, and an independent filter plus a gate on real held-out data decide which images may
join retraining.
"""

import os

# albumentations checks PyPI for a newer release on import unless told not to; we never reach the
# network unasked, so this must be set before anything imports albumentations.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from vision_si.config import RunConfig, load_config  # noqa: E402
from vision_si.errors import ConfigError, DataError, InputError  # noqa: E402

__version__ = "0.1.0"

__all__ = ["RunConfig", "load_config", "InputError", "ConfigError", "DataError", "__version__"]
