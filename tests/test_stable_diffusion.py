"""Stable Diffusion backends on tiny random components built here and loaded offline from tmp folders."""

from __future__ import annotations

import json
import pickle
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from vision_si.errors import ConfigError, DataError, InputError  # noqa: E402
from vision_si.generators import create_generator, list_generators, load_preset  # noqa: E402
from vision_si.generators.presets import generator_kwargs  # noqa: E402
from vision_si.generators.stable_diffusion import class_prompts, import_sd, mask_box  # noqa: E402

pytestmark = pytest.mark.sd

CLASSES = ["mono-functional", "mono-defective"]


def tiny_tokenizer(folder):
    """A CLIP BPE tokenizer over single letters, from a vocab.json and merges.txt written here."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in "abcdefghijklmnopqrstuvwxyz":
            vocab[c + suffix] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=16)


def save_tiny_sd(folder, tokenizer, unet_in_channels):
    """A random tiny Stable Diffusion pipeline folder (UNet, VAE, CLIP text encoder, DDIM) for CPU tests."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=unet_in_channels, out_channels=4,
                                block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=16, attention_head_dim=2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_attention_heads=2, num_hidden_layers=2, max_position_embeddings=16,
                                        projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two pipeline folders: text-to-image/img2img (4-channel UNet) and inpainting (9-channel UNet)."""
    root = tmp_path_factory.mktemp("sd")
    tok = tiny_tokenizer(root / "vocab")
    return {"sd": save_tiny_sd(root / "tiny-sd", tok, 4), "inpaint": save_tiny_sd(root / "tiny-inpaint", tok, 9)}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _fit(backend, model, images, **preset):
    cfg = {"name": "test", "model": str(model), "resolution": 32, "device": "cpu",
           "prompts": {"template": "an image of a {class_words} cell", "negative": "text"},
           "sample": {"sampler": "ddim", "steps": 2, "guidance_scale": 2.0}, **preset}
    return create_generator(backend, **cfg).fit(images, np.zeros(len(images), dtype=np.int64), CLASSES, seed=0)


def _images(n, channels, size, seed=0):
    return np.random.default_rng(seed).random((n, channels, size, size), dtype=np.float32)


def test_backends_registered_and_presets_build():
    assert {"sd-txt2img", "sd-img2img", "sd-inpaint"} <= set(list_generators())
    for backend in ("sd-txt2img", "sd-img2img", "sd-inpaint"):
        preset = load_preset(backend)
        assert preset["backend"] == backend
        settings = create_generator(backend, **generator_kwargs(preset)).settings()  # no loading yet
        assert "{class" in settings["prompts"]["template"]


def test_txt2img_grayscale_shape_range_and_seeded(models):
    gen = _fit("sd-txt2img", models["sd"], _images(4, 1, 12))
    a = gen.generate_batch(np.array([0, 1]), [11, 12], mode="class")
    assert a.shape == (2, 1, 12, 12) and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1 and a.std() > 0
    b = gen.generate_batch(np.array([0, 1]), [11, 12], mode="class")
    np.testing.assert_array_equal(a, b)
    alone = gen.generate_batch(np.array([1]), [12], mode="class")
    np.testing.assert_allclose(alone[0], a[1], atol=1e-4)  # an image does not depend on its batch neighbours
    assert np.abs(a[0] - gen.generate_batch(np.array([0]), [13], mode="class")[0]).max() > 1e-3
    with pytest.raises(ConfigError, match="class-mode images, not 'exemplar'"):
        gen.generate_batch(np.array([0]), [1], mode="exemplar", exemplars=_images(1, 1, 12))
    assert len(gen.checkpoint_sha256) == 64


def test_img2img_rgb_follows_exemplar_and_strength(models):
    ex = _images(2, 3, 16, seed=1)
    gen = _fit("sd-img2img", models["sd"], ex)
    out = gen.generate_batch(np.array([0, 1]), [5, 6], mode="exemplar", exemplars=ex, strength=0.5)
    assert out.shape == (2, 3, 16, 16) and out.min() >= 0 and out.max() <= 1
    np.testing.assert_array_equal(out, gen.generate_batch(np.array([0, 1]), [5, 6], mode="exemplar",
                                                          exemplars=ex, strength=0.5))
    np.testing.assert_array_equal(gen.generate_batch(np.array([0]), [5], mode="exemplar", exemplars=ex[:1],
                                                     strength=0.0), ex[:1])
    full = gen.generate_batch(np.array([0, 1]), [5, 6], mode="exemplar", exemplars=ex, strength=1.0)
    assert np.abs(full - out).mean() > 1e-3
    with pytest.raises(ConfigError, match="exemplar-mode images, not 'class'"):
        gen.generate_batch(np.array([0]), [1], mode="class")
    with pytest.raises(ConfigError, match="no denoising step"):
        gen.generate_batch(np.array([0]), [1], mode="exemplar", exemplars=ex[:1], strength=0.2)


def test_inpaint_changes_only_the_box(models):
    ex = _images(2, 1, 16, seed=2)
    gen = _fit("sd-inpaint", models["inpaint"], ex, mask={"size": 0.5, "position": "center"})
    out = gen.generate_batch(np.array([1, 0]), [7, 8], mode="exemplar", exemplars=ex, strength=1.0)
    assert out.shape == (2, 1, 16, 16)
    inside = np.zeros((16, 16), dtype=bool)
    inside[4:12, 4:12] = True
    np.testing.assert_array_equal(out[:, :, ~inside], ex[:, :, ~inside])
    assert np.abs(out[:, :, inside] - ex[:, :, inside]).mean() > 1e-2
    np.testing.assert_array_equal(out, gen.generate_batch(np.array([1, 0]), [7, 8], mode="exemplar",
                                                          exemplars=ex, strength=1.0))
    half = gen.generate_batch(np.array([1, 0]), [7, 8], mode="exemplar", exemplars=ex, strength=0.5)
    np.testing.assert_array_equal(half[:, :, ~inside], ex[:, :, ~inside])
    assert np.abs(half - out).max() > 1e-3


def test_inpaint_random_boxes_follow_the_image_seed(models):
    ex = np.zeros((2, 1, 16, 16), dtype=np.float32)  # black exemplars: the repainted box shows where it is
    gen = _fit("sd-inpaint", models["inpaint"], ex, mask={"size": 0.25, "position": "random"})
    out = gen.generate_batch(np.array([0, 0]), [21, 22], mode="exemplar", exemplars=ex, strength=1.0)
    changed = out[:, 0] != 0
    for k, seed in enumerate((21, 22)):
        top, left, bottom, right = mask_box({"size": 0.25, "position": "random"}, seed)
        box = np.zeros((16, 16), dtype=bool)
        box[round(top * 16):round(bottom * 16), round(left * 16):round(right * 16)] = True
        assert not changed[k][~box].any() and changed[k][box].mean() > 0.5
    assert not np.array_equal(changed[0], changed[1])


def test_random_box_is_seeded_per_image():
    spec = {"size": 0.25, "position": "random"}
    assert mask_box(spec, 3) == mask_box(spec, 3)
    boxes = {mask_box(spec, s) for s in range(20)}
    assert len(boxes) == 20
    assert all(t >= 0 and le >= 0 and b <= 1 and r <= 1 and b - t == pytest.approx(0.25) for t, le, b, r in boxes)
    assert mask_box({"size": 0.5, "position": "center"}, 9) == (0.25, 0.25, 0.75, 0.75)


def test_prompts_from_template_and_per_class_entries():
    prompts = {"template": "an electroluminescence image of a {class_words} solar cell",
               "classes": {"mono-defective": "a cracked cell"}, "negative": ""}
    assert class_prompts(prompts, CLASSES, "p") == ["an electroluminescence image of a mono functional solar cell",
                                                    "a cracked cell"]
    with pytest.raises(ConfigError, match=r"\['poly'\], not among"):
        class_prompts({**prompts, "classes": {"poly": "x"}}, CLASSES, "p")
    with pytest.raises(ConfigError, match="cannot be filled"):
        class_prompts({**prompts, "template": "{colour}"}, CLASSES, "p")


def test_pickled_generator_reloads_weights_and_repeats_images(models):
    gen = _fit("sd-txt2img", models["sd"], _images(2, 3, 16))
    blob = pickle.dumps(gen)
    assert len(blob) < 20_000  # parameters only, the weights are reloaded from `model`
    clone = pickle.loads(blob)
    assert clone.checkpoint_sha256 == gen.checkpoint_sha256
    np.testing.assert_array_equal(clone.generate_batch(np.array([1]), [3], mode="class"),
                                  gen.generate_batch(np.array([1]), [3], mode="class"))


def test_lora_weights_load_and_change_the_model(models, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(models["sd"] / "unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights="gaussian"))
    with torch.no_grad():  # peft starts lora_B at zero (a no-op adapter); make it a real change
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet))
    files = list((tmp_path / "lora").glob("*.safetensors"))
    assert len(files) == 1
    base = _fit("sd-txt2img", models["sd"], _images(2, 3, 16))
    tuned = _fit("sd-txt2img", models["sd"], _images(2, 3, 16), lora=str(files[0]))
    assert tuned.checkpoint_sha256 != base.checkpoint_sha256
    assert np.abs(tuned.generate_batch(np.array([0]), [1], mode="class")
                  - base.generate_batch(np.array([0]), [1], mode="class")).max() > 1e-4
    with pytest.raises(DataError, match="LoRA weights .* not found"):
        _fit("sd-txt2img", models["sd"], _images(2, 3, 16), lora=str(tmp_path / "missing.safetensors"))


def test_offline_hub_id_and_missing_folder_are_data_errors(tmp_path, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(DataError, match="offline"):
        _fit("sd-txt2img", "vision-si-tests/not-a-cached-model", _images(1, 3, 16))
    with pytest.raises(DataError, match="model folder .* not found"):
        _fit("sd-txt2img", str(tmp_path / "nowhere"), _images(1, 3, 16))


def test_bad_preset_values_name_the_key():
    with pytest.raises(ConfigError, match=r"resolution=30"):
        create_generator("sd-img2img", model="m", resolution=30).settings()
    with pytest.raises(ConfigError, match=r"sample.sampler='lms'"):
        create_generator("sd-img2img", model="m", sample={"sampler": "lms"}).settings()
    with pytest.raises(ConfigError, match=r"'mask' applies to backend sd-inpaint only"):
        create_generator("sd-img2img", model="m", mask={"size": 0.3}).settings()
    with pytest.raises(ConfigError, match=r"model=None"):
        create_generator("sd-txt2img").settings()


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(InputError, match=r"need transformers, which is not installed: .*pip install -e '\.\[sd\]'"):
        import_sd()


def test_run_generation_writes_rows_that_regenerate_their_images(models, tmp_path):
    import yaml

    from vision_si.config import GenerateConfig
    from vision_si.data.arrays import LabelledImages
    from vision_si.generators import GenerationRequest
    from vision_si.generators.runner import regenerate, run_generation

    preset = tmp_path / "tiny-sd-img2img.yaml"
    preset.write_text(yaml.safe_dump({"backend": "sd-img2img", "model": str(models["sd"]), "resolution": 16,
                                      "device": "cpu", "sample": {"sampler": "ddim", "steps": 2,
                                                                  "guidance_scale": 2.0}}))
    train = _images(3, 1, 12, seed=4)
    ids = ["a", "b", "c"]
    request = GenerationRequest(class_index=1, class_name=CLASSES[1], slice_id="s1", count=3, exemplar_ids=["b", "c"],
                                mode="exemplar", strength=0.5)
    result = run_generation(GenerateConfig(preset=str(preset), batch_size=2, cache_dir=str(tmp_path / "cache")),
                            [request], train=LabelledImages(train, np.array([0, 1, 1]), ids, ["", "", ""]),
                            classes=CLASSES, out_dir=tmp_path / "out", seed=3, progress=False)
    assert [r.backend for r in result.rows] == ["sd-img2img"] * 3
    assert [r.exemplar_ids for r in result.rows] == [["b"], ["c"], ["b"]]
    gen = create_generator("sd-img2img", **generator_kwargs(load_preset(preset)))
    gen.fit(train, np.array([0, 1, 1]), CLASSES, seed=3)
    assert result.generator_sha256 == gen.checkpoint_sha256
    other = create_generator("sd-img2img", **generator_kwargs(load_preset(preset)), prompts={"negative": "noise"})
    assert other.fit(train, np.zeros(3), CLASSES, seed=3).checkpoint_sha256 != gen.checkpoint_sha256
    for row in result.rows:
        on_disk = np.asarray(Image.open(tmp_path / "out" / row.path), dtype=np.float32)[None] / 255
        again = regenerate(row, gen, rows=result.rows, exemplars=dict(zip(ids, train, strict=True)))
        np.testing.assert_array_equal(again, on_disk)
