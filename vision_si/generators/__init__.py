"""Generator plug-ins: the protocol, the registry, the presets and the generation runner.

Backends (`ddpm`, ...) live one per module and register themselves when `create_generator` or
`list_generators` first runs, so importing this package stays light.
"""

from vision_si.generators.base import (
    GenerationRequest,
    Generator,
    ManifestRow,
    create_generator,
    image_seed,
    list_generators,
    register_generator,
)
from vision_si.generators.presets import list_presets, load_preset, resolve_preset

__all__ = ["Generator", "GenerationRequest", "ManifestRow", "create_generator", "image_seed", "list_generators",
           "list_presets", "load_preset", "register_generator", "resolve_preset"]
