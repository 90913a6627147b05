"""Generator registry, presets, requests and manifest rows."""

from __future__ import annotations

import dataclasses

import pytest

from vision_si.config import GenerateConfig
from vision_si.errors import ConfigError
from vision_si.generators import (
    GenerationRequest,
    ManifestRow,
    create_generator,
    image_seed,
    list_generators,
    list_presets,
    load_preset,
    resolve_preset,
)
from vision_si.generators.presets import generator_kwargs


def test_registry_knows_ddpm_and_refuses_unknown_names_listing_known_ones():
    assert "ddpm" in list_generators()
    with pytest.raises(ConfigError, match=r"unknown generator 'nope'.*ddpm"):
        create_generator("nope")


def test_create_generator_refuses_unknown_keys_listing_allowed_ones():
    with pytest.raises(ConfigError, match=r"does not take \['colour'\].*resolution"):
        create_generator("ddpm", colour=1)


def test_shipped_presets_load_and_validate():
    assert {"tiny", "quick", "full"} <= set(list_presets())
    for name in ("tiny", "quick", "full"):
        preset = load_preset(name)
        assert preset["name"] == name and preset["backend"] == "ddpm"
        settings = create_generator(preset["backend"], **generator_kwargs(preset)).settings()
        assert settings["sample"]["sampler"] in ("ddim", "dpmsolver++", "ddpm")


def test_unknown_preset_name_lists_known_presets():
    with pytest.raises(ConfigError, match=r"unknown generator preset 'qiuck'; known: ") as err:
        load_preset("qiuck")
    assert all(name in str(err.value) for name in ("full", "quick", "tiny"))


def test_preset_from_path_and_bad_values_name_the_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("backend: ddpm\nresolution: 16\nsample: {sampler: euler}\n")
    preset = load_preset(path)
    assert preset["name"] == "mine"
    gen = create_generator("ddpm", **generator_kwargs(preset))
    with pytest.raises(ConfigError, match=r"sample.sampler='euler'"):
        gen.settings()
    (tmp_path / "typo.yaml").write_text("backend: ddpm\ntrain: {stpes: 3}\n")
    typo = load_preset(tmp_path / "typo.yaml")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['stpes'\] in 'train'"):
        create_generator("ddpm", **generator_kwargs(typo)).settings()
    with pytest.raises(ConfigError, match="not found"):
        load_preset(tmp_path / "missing.yaml")


def test_generate_config_overrides_preset_sampling_settings():
    base = resolve_preset(GenerateConfig(preset="tiny"))
    over = resolve_preset(GenerateConfig(preset="tiny", steps=7, guidance_scale=3.5))
    assert over["sample"]["steps"] == 7 and over["sample"]["guidance_scale"] == 3.5
    assert base["sample"]["steps"] == load_preset("tiny")["sample"]["steps"]
    assert resolve_preset(GenerateConfig(preset="tiny", backend="other"))["backend"] == "other"


def test_request_validation_names_the_value():
    with pytest.raises(ConfigError, match="mode 'sketch'"):
        GenerationRequest(0, "a", "s0", 3, mode="sketch")
    with pytest.raises(ConfigError, match="no exemplar_ids"):
        GenerationRequest(0, "a", "s0", 3, mode="exemplar")
    with pytest.raises(ConfigError, match="strength 1.5"):
        GenerationRequest(0, "a", "s0", 3, exemplar_ids=["x"], strength=1.5)


def test_image_seed_depends_on_run_seed_and_id_only():
    assert image_seed(0, "syn-r01-000001") == image_seed(0, "syn-r01-000001")
    seeds = {image_seed(s, f"syn-r01-{k:06d}") for s in range(3) for k in range(100)}
    assert len(seeds) == 300
    assert all(0 <= s < 2**63 for s in seeds)


def test_manifest_row_round_trips_and_refuses_unknown_keys():
    row = ManifestRow(id="syn-r01-000000", path="images/syn-r01-000000.png", sha256="ab", class_index=1,
                      class_name="b", slice="s1", mode="exemplar", preset="tiny", generator_sha256="cd", seed=5,
                      exemplar_ids=["x"], strength=0.5, steps=2, guidance=2.0, seconds=0.1)
    assert ManifestRow.from_dict(row.to_dict()) == row
    with pytest.raises(ValueError, match="unknown keys"):
        ManifestRow.from_dict({**dataclasses.asdict(row), "colour": 1})


def test_backend_output_becomes_a_data_batch_at_the_datas_channels_and_size():
    import numpy as np
    import torch

    from vision_si.generators.base import match_data, to_data_batch

    rgb = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.4 - 0.2  # overshoots [0, 1]
    out = to_data_batch(rgb, 1, (4, 6))
    assert out.dtype == np.float32 and out.shape == (2, 1, 4, 6) and out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(to_data_batch(rgb, 1, (8, 8)), rgb.mean(1, keepdim=True).clamp(0, 1).numpy())
    luma = (0.299, 0.587, 0.114)
    weighted = sum(w * rgb[:, k:k + 1] for k, w in enumerate(luma)).clamp(0, 1).numpy()
    np.testing.assert_allclose(to_data_batch(rgb, 1, (8, 8), gray_weights=luma), weighted, rtol=1e-6)
    gray = to_data_batch(rgb[:, :1], 3, (8, 8))
    assert gray.shape == (2, 3, 8, 8) and (gray == gray[:, :1]).all()  # grayscale repeated, never tinted
    # guided sampling differentiates through the conversion
    x = rgb.clone().requires_grad_(True)
    match_data(x, 1, (4, 4)).sum().backward()
    assert x.grad is not None and (x.grad.abs().sum(dim=(0, 2, 3)) > 0).all()


def test_generate_train_seed_is_a_seed_or_null():
    from vision_si.config import config_from_dict

    assert config_from_dict({}).generate.train_seed is None
    assert config_from_dict({"generate": {"train_seed": 3}}).generate.train_seed == 3
    with pytest.raises(ConfigError, match=r"generate\.train_seed.*-1.*>= 0 or null"):
        config_from_dict({"generate": {"train_seed": -1}})
    with pytest.raises(ConfigError, match=r"generate\.train_seed"):
        config_from_dict({"generate": {"train_seed": "zero"}})
