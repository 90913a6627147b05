"""Albumentations pipelines for grayscale medical and industrial images.

Presets (input and output: float32 H×W×C in [0, 1], square, C = 1 or 3):

- `none`: no augmentation (`build_augmentation` returns None).
- `flips`: horizontal and vertical flips only, and a mild brightness/contrast jitter. For images
  whose label does not depend on a mirror image (solar cells, histology); measured on ELPV at 64 px,
  the `standard` pipeline's CLAHE, noise, blur and affine jitter made training slower and worse.
- `light`: small affine jitter and brightness/contrast. No flips or right-angle rotations, so it
  is safe where orientation carries meaning (digits, text, chest X-ray laterality).
- `standard`: the eight flips/right-angle rotations of a square (`SquareSymmetry`), small affine,
  CLAHE, brightness/contrast, gamma, mild Gaussian noise and blur. Assumes orientation carries no
  label information, true for solar cells (ELPV), histology, dermoscopy, most inspection images.
- `strong`: `standard` with wider ranges plus elastic or grid distortion.

Geometric transforms reflect at the border instead of filling with black, because a black wedge
is itself a feature a classifier can learn. CLAHE works on uint8; albumentations 2.0 converts a
float32 image to uint8 and back inside the transform, and the output stays float32 in [0, 1]
(a test checks this). albumentations 2.0 clips float results of its pixel transforms to [0, 1];
a test checks that too. Every pipeline is seeded (`Compose(seed=...)`). `save_augmentation` writes it with `albumentations.save` as JSON into the run directory.
"""

from __future__ import annotations

from pathlib import Path

# importing this module runs vision_si/__init__.py first, which sets NO_ALBUMENTATIONS_UPDATE
import albumentations as A
import cv2

PRESETS = ("none", "flips", "light", "standard", "strong")
_REFLECT = cv2.BORDER_REFLECT_101


def _light() -> list:
    return [
        A.Affine(translate_percent=(-0.04, 0.04), scale=(0.95, 1.05), rotate=(-5, 5),
                 border_mode=_REFLECT, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
    ]


def _standard(strength: float) -> list:
    s = strength
    return [
        A.SquareSymmetry(p=1.0),
        A.Affine(translate_percent=(-0.06 * s, 0.06 * s), scale=(1 - 0.1 * s, 1 + 0.1 * s),
                 rotate=(-10 * s, 10 * s), border_mode=_REFLECT, p=0.5),
        A.CLAHE(clip_limit=(1.0, 2.0 + s), tile_grid_size=(4, 4), p=0.2),
        A.RandomBrightnessContrast(brightness_limit=0.15 * s, contrast_limit=0.15 * s, p=0.5),
        A.RandomGamma(gamma_limit=(100 - 15 * s, 100 + 15 * s), p=0.3),
        A.GaussNoise(std_range=(0.01, 0.03 * s), p=0.2),
        A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.1, 0.6 * s), p=0.1),
    ]


def build_augmentation(preset: str, channels: int, seed: int) -> A.Compose | None:
    """The seeded pipeline for `preset` (see the module doc), or None for `none`."""
    if preset not in PRESETS:
        raise ValueError(f"augmentation preset must be one of {PRESETS}, got {preset!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if preset == "none":
        return None
    if preset == "flips":
        transforms = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5),
                      A.RandomBrightnessContrast(brightness_limit=0.05, contrast_limit=0.05, p=0.3)]
    elif preset == "light":
        transforms = _light()
    elif preset == "standard":
        transforms = _standard(1.0)
    else:
        transforms = _standard(1.5) + [
            A.OneOf([
                A.ElasticTransform(alpha=1.0, sigma=8.0, border_mode=_REFLECT),
                A.GridDistortion(num_steps=5, distort_limit=(-0.2, 0.2), border_mode=_REFLECT),
            ], p=0.3),
        ]
    return A.Compose(transforms, seed=seed)


def save_augmentation(compose: A.Compose | None, path: str | Path) -> None:
    """Write the pipeline as albumentations JSON (`A.load(path)` rebuilds it); `None` writes `null`."""
    path = Path(path)
    if compose is None:
        path.write_text("null\n", encoding="utf-8")
        return
    A.save(compose, str(path), data_format="json")
