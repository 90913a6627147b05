"""The `ddpm` backend and its class-conditional pipeline, on tiny UNets and 16 px images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from vision_si.errors import DataError
from vision_si.generators import create_generator, load_preset
from vision_si.generators.ddpm import DDPMGenerator, build_unet, denoising_loss, noise_schedule, train_unet
from vision_si.generators.pipeline import ClassConditionalPipeline, make_scheduler
from vision_si.generators.presets import generator_kwargs

CLASSES = ["dark", "bright"]


def toy_data(n: int = 32, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class 0 dark, class 1 bright, with a little texture: conditioning is easy to see in the mean."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    base = np.where(labels == 1, 0.8, 0.2)[:, None, None, None]
    images = np.clip(base + 0.08 * rng.standard_normal((n, 1, size, size)), 0, 1).astype(np.float32)
    return images, labels.astype(np.int64)


def tiny(**train) -> DDPMGenerator:
    kwargs = generator_kwargs(load_preset("tiny"))
    kwargs["train"] = {**kwargs["train"], **train}
    return create_generator("ddpm", **kwargs)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    images, labels = toy_data()
    gen = tiny(steps=80).fit(images, labels, CLASSES, seed=0, cache_dir=tmp_path_factory.mktemp("cache"),
                             progress=False)
    return gen, images, labels


def test_training_lowers_the_denoising_loss_on_a_fixed_batch():
    images, labels = toy_data()
    cfg = {**tiny().settings()["train"], "steps": 40}
    torch.manual_seed(0)
    unet = build_unet(2, 1, 16, tiny().settings()["unet"])
    sched = noise_schedule(cfg)
    x = torch.from_numpy(images) * 2 - 1
    y = torch.from_numpy(labels)

    def fixed_loss(model) -> float:
        with torch.no_grad():
            return float(denoising_loss(model, sched, x, y, torch.Generator().manual_seed(123)))

    before = fixed_loss(unet)
    ema_unet, losses, trained = train_unet(unet, x, y, 2, cfg, seed=0, device=torch.device("cpu"), progress=False)
    assert trained == 40 and len(losses) == 40
    assert fixed_loss(unet) < 0.6 * before
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_class_sampling_returns_requested_shape_range_and_classes(fitted):
    gen, _, _ = fitted
    seeds = [1, 2, 3, 4, 5, 6]
    dark = gen.generate_batch(np.zeros(6, np.int64), seeds, mode="class", steps=10)
    bright = gen.generate_batch(np.ones(6, np.int64), seeds, mode="class", steps=10)
    assert dark.shape == bright.shape == (6, 1, 16, 16) and dark.dtype == np.float32
    assert min(dark.min(), bright.min()) >= 0 and max(dark.max(), bright.max()) <= 1
    # the label steers the image: from the same noise, the bright class comes out brighter every time
    assert (bright.mean(axis=(1, 2, 3)) - dark.mean(axis=(1, 2, 3)) > 0.03).all()


def test_same_seed_same_image_and_batch_matches_one_by_one(fitted):
    gen, _, _ = fitted
    labels, seeds = np.array([0, 1, 1, 0]), [11, 12, 13, 14]
    batch = gen.generate_batch(labels, seeds, mode="class")
    again = gen.generate_batch(labels, seeds, mode="class")
    np.testing.assert_array_equal(batch, again)  # same batch, same bits
    singles = np.concatenate([gen.generate_batch(labels[k:k + 1], seeds[k:k + 1], mode="class") for k in range(4)])
    # an image does not depend on its neighbours' noise; only kernel rounding differs with batch shape,
    # at most one 8-bit level (the runner therefore recomputes an image inside its original chunk)
    assert np.abs(np.round(batch * 255) - np.round(singles * 255)).max() <= 1
    assert np.abs(batch - singles).mean() < 1e-4
    other = gen.generate_batch(labels, [21, 22, 23, 24], mode="class")
    assert np.abs(other - batch).mean() > 1e-3


def test_exemplar_mode_stays_closer_to_exemplars_at_lower_strength(fitted):
    gen, images, labels = fitted
    ex, lab, seeds = images[:4], labels[:4], [1, 2, 3, 4]
    kept = gen.generate_batch(lab, seeds, mode="exemplar", exemplars=ex, strength=0.0, steps=10)
    np.testing.assert_allclose(kept, ex, atol=1e-6)
    near = gen.generate_batch(lab, seeds, mode="exemplar", exemplars=ex, strength=0.1, steps=10)
    far = gen.generate_batch(lab, seeds, mode="exemplar", exemplars=ex, strength=0.9, steps=10)
    assert np.abs(near - ex).mean() < 0.05
    assert np.abs(near - ex).mean() < np.abs(far - ex).mean()
    with pytest.raises(ValueError, match="exemplars of shape"):
        gen.generate_batch(lab, seeds, mode="exemplar", exemplars=None)


def test_guided_mode_moves_the_margin_toward_the_boundary(fitted):
    gen, _, _ = fitted

    def toy_classifier(x: torch.Tensor) -> torch.Tensor:
        """Logit of 'bright' grows with mean brightness; 'dark' is a constant threshold at 0.1."""
        bright = 12 * (x.mean(dim=(1, 2, 3)) - 0.1)
        return torch.stack([torch.zeros_like(bright), bright], dim=1)

    def margin(x: np.ndarray) -> np.ndarray:
        logits = toy_classifier(torch.from_numpy(x)).numpy()
        return logits[:, 1] - logits[:, 0]

    labels, seeds = np.array([1, 1, 1, 1]), [5, 6, 7, 8]
    plain = gen.generate_batch(labels, seeds, mode="class", steps=10)
    guided = gen.generate_batch(labels, seeds, mode="guided", classifier_fn=toy_classifier, classifier_scale=1.0,
                                steps=10)
    assert (margin(plain) > 0).all()  # unguided bright samples are confidently bright
    assert (margin(guided) < margin(plain)).all()  # guidance pulls every one toward the boundary
    with pytest.raises(ValueError, match="needs a classifier_fn"):
        gen.generate_batch(labels, seeds, mode="guided")


def test_second_fit_on_the_same_data_is_a_cache_hit(fitted, tmp_path):
    gen, images, labels = fitted
    again = tiny(steps=80).fit(images, labels, CLASSES, seed=0, cache_dir=gen.folder_.parent, progress=False)
    assert again.cache_hit_ and again.trained_steps_ == 0
    assert again.checkpoint_sha256 == gen.checkpoint_sha256
    np.testing.assert_array_equal(again.generate_batch([1], [3], mode="class"), gen.generate_batch([1], [3], mode="class"))
    other_seed = tiny(steps=80).fit(images, labels, CLASSES, seed=1, cache_dir=gen.folder_.parent, progress=False)
    assert not other_seed.cache_hit_ and other_seed.trained_steps_ == 80
    # sampling settings are not part of the key: a new sampler reuses the trained model
    kwargs = generator_kwargs(load_preset("tiny"))
    kwargs["train"] = {**kwargs["train"], "steps": 80}
    kwargs["sample"] = {**kwargs["sample"], "sampler": "dpmsolver++", "steps": 3}
    resampled = create_generator("ddpm", **kwargs).fit(images, labels, CLASSES, seed=0, cache_dir=gen.folder_.parent,
                                                       progress=False)
    assert resampled.cache_hit_ and type(resampled.pipeline_.scheduler).__name__ == "DPMSolverMultistepScheduler"


def test_training_resumes_after_a_crash_to_the_same_weights(tmp_path):
    images, labels = toy_data()

    class Crash(RuntimeError):
        pass

    def crash_at_15(step: int) -> None:
        if step == 15:
            raise Crash

    with pytest.raises(Crash):
        tiny(steps=20, checkpoint_every=10).fit(images, labels, CLASSES, seed=0, cache_dir=tmp_path / "a",
                                                progress=False, on_step=crash_at_15)
    resumed = tiny(steps=20, checkpoint_every=10).fit(images, labels, CLASSES, seed=0, cache_dir=tmp_path / "a",
                                                      progress=False)
    assert resumed.trained_steps_ == 10  # picked up at the step-10 checkpoint
    straight = tiny(steps=20, checkpoint_every=10).fit(images, labels, CLASSES, seed=0, cache_dir=tmp_path / "b",
                                                       progress=False)
    assert resumed.checkpoint_sha256 == straight.checkpoint_sha256
    assert resumed.loss_history_ == straight.loss_history_
    assert not list((tmp_path / "a").glob("*.partial")) and not list((tmp_path / "a").glob("*.lock"))


def test_pipeline_round_trips_through_save_pretrained(fitted, tmp_path):
    gen, _, _ = fitted
    gen.pipeline_.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = ClassConditionalPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    a = gen.pipeline_([0, 1], generator=gens(), num_inference_steps=3, guidance_scale=2.0).images
    b = loaded([0, 1], generator=gens(), num_inference_steps=3, guidance_scale=2.0).images
    np.testing.assert_array_equal(a, b)
    reloaded = DDPMGenerator.load(gen.folder_)
    assert reloaded.checkpoint_sha256 == gen.checkpoint_sha256


def test_pipeline_checks_inputs_up_front():
    unet = build_unet(2, 1, 16, {"block_out_channels": [8, 16], "layers_per_block": 1, "attention": True,
                                 "norm_num_groups": 8})
    pipe = ClassConditionalPipeline(unet, make_scheduler("ddim", DDPMScheduler().config))
    with pytest.raises(ValueError, match=r"class_labels must lie in 0..1, got \[0, 2\]"):
        pipe([0, 2], num_inference_steps=2)
    with pytest.raises(ValueError, match="needs init_images"):
        pipe([0], num_inference_steps=2, strength=0.5)
    with pytest.raises(ValueError, match=r"init_images must have shape \(1, 1, 16, 16\)"):
        pipe([0], num_inference_steps=2, init_images=np.zeros((1, 1, 8, 8), np.float32), strength=0.5)
    with pytest.raises(ValueError, match="3 generators for 2 images"):
        pipe([0, 1], generator=[torch.Generator()] * 3, num_inference_steps=2)
    out = pipe([0, 1], generator=[torch.Generator().manual_seed(0)] * 2, num_inference_steps=2).images
    assert out.shape == (2, 1, 16, 16)  # attention variant runs too


def test_fit_checks_training_data():
    with pytest.raises(DataError, match=r"must lie in \[0, 1\]"):
        tiny().fit(np.full((4, 1, 16, 16), 2.0, np.float32), np.zeros(4), CLASSES, seed=0, progress=False)
    with pytest.raises(DataError, match="4 images need as many integer labels, got shape \\(3,\\)"):
        tiny().fit(np.zeros((4, 1, 16, 16), np.float32), np.zeros(3), CLASSES, seed=0, progress=False)
    with pytest.raises(RuntimeError, match="not fitted"):
        tiny().generate_batch([0], [0], mode="class")
