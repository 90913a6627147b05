"""Generator plug-ins: the protocol, the registry and the backends."""

from vision_si.generators.base import (
    Generator,
    GenerationRequest,
    ManifestRow,
    create_generator,
    image_seed,
    list_generators,
    register_generator,
)

__all__ = ["Generator", "GenerationRequest", "ManifestRow", "create_generator", "image_seed",
           "list_generators", "register_generator"]
