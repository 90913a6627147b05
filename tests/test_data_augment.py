"""Augmentation presets: float32 [0, 1] in and out, seeded, serialisable."""

from __future__ import annotations

import numpy as np
import pytest

from vision_si.data import PRESETS, build_augmentation, save_augmentation


def batch(channels, n=40, size=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, size, size, channels)).astype(np.float32)
    x[:, 0, 0] = 0.0
    x[:, -1, -1] = 1.0
    return x


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("preset", ["light", "standard", "strong"])
def test_presets_keep_float32_in_unit_range_and_shape(preset, channels):
    aug = build_augmentation(preset, channels, seed=0)
    changed = 0
    for x in batch(channels):
        y = aug(image=x)["image"]
        assert y.dtype == np.float32 and y.shape == x.shape
        assert y.min() >= 0.0 and y.max() <= 1.0
        changed += not np.array_equal(x, y)
    assert changed >= 20  # the pipeline actually changes most images (light leaves ~1 in 4 alone)


def test_clahe_on_float_input_stays_float_in_range():
    import albumentations as A

    clahe = A.Compose([A.CLAHE(clip_limit=(4, 4), p=1.0)], seed=0)
    x = (np.linspace(0.3, 0.5, 256, dtype=np.float32).reshape(16, 16, 1))  # low contrast
    y = clahe(image=x)["image"]
    assert y.dtype == np.float32 and y.min() >= 0 and y.max() <= 1
    assert y.std() > x.std()  # contrast went up: the float → uint8 → float round trip worked
    assert any(isinstance(t, A.CLAHE) for t in build_augmentation("standard", 1, 0).transforms)


def test_same_seed_same_images_different_seed_different():
    x = batch(1, n=10)
    runs = []
    for seed in (3, 3, 4):
        aug = build_augmentation("standard", 1, seed)
        runs.append(np.stack([aug(image=im)["image"] for im in x]))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_none_and_bad_arguments():
    assert build_augmentation("none", 1, 0) is None
    assert set(PRESETS) == {"none", "flips", "light", "standard", "strong"}
    with pytest.raises(ValueError, match="heavy"):
        build_augmentation("heavy", 1, 0)
    with pytest.raises(ValueError, match="channels"):
        build_augmentation("light", 2, 0)


def test_light_has_no_flips_or_right_angle_turns():
    import albumentations as A

    names = {type(t).__name__ for t in build_augmentation("light", 1, 0).transforms}
    assert not names & {"SquareSymmetry", "D4", "HorizontalFlip", "VerticalFlip", "RandomRotate90"}
    assert isinstance(build_augmentation("standard", 1, 0).transforms[0], A.SquareSymmetry)


def test_save_and_load_round_trip(tmp_path):
    import albumentations as A

    aug = build_augmentation("strong", 1, seed=0)
    save_augmentation(aug, tmp_path / "augment.json")
    loaded = A.load(str(tmp_path / "augment.json"), data_format="json")
    assert [type(t).__name__ for t in loaded.transforms] == [type(t).__name__ for t in aug.transforms]
    assert A.to_dict(loaded) == A.to_dict(aug)
    save_augmentation(None, tmp_path / "none.json")
    assert (tmp_path / "none.json").read_text().strip() == "null"
