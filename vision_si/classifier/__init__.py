"""timm classifiers: create, train on a fixed step budget, checkpoint without pickle, predict.

- `model`: `create_classifier` (any timm architecture; weights from scratch, a local file or the
  hub), `normalisation`, `resolve_device`.
- `training`: `train_classifier`, exactly `cfg.steps` optimizer steps, bit-identical on CPU for a seed.
- `resume`: the resume state of a crashed run and the fingerprint of the arguments it belongs to.
- `checkpoint`: `save_checkpoint`/`load_classifier` (`model.safetensors` + `model.json`, never unpickled),
  `TrainedClassifier`.
- `inference`: `predict` (logits, probabilities, pre-logit embeddings; optional cache), `image_keys`.

Everything is imported from here: `from vision_si.classifier import train_classifier, predict`.
"""

from vision_si.classifier.checkpoint import (
    FORMAT,
    HISTORY_FILE,
    META_FILE,
    RESUME_FILE,
    WEIGHTS_FILE,
    TrainedClassifier,
    load_classifier,
    save_checkpoint,
)
from vision_si.classifier.inference import Prediction, image_keys, predict
from vision_si.classifier.model import create_classifier, normalisation, resolve_device
from vision_si.classifier.training import train_classifier

__all__ = [
    "FORMAT", "WEIGHTS_FILE", "META_FILE", "HISTORY_FILE", "RESUME_FILE",
    "TrainedClassifier", "Prediction",
    "resolve_device", "create_classifier", "normalisation",
    "train_classifier", "save_checkpoint", "load_classifier", "image_keys", "predict",
]
