"""A class-conditional diffusion pipeline in the diffusers style, with the three targeting modes.

`DDPMPipeline` cannot pass class labels, so this small `DiffusionPipeline` subclass holds a
`UNet2DModel` built with `num_class_embeds = n_classes + 1` (the last index is the null class of
classifier-free guidance) and a diffusers scheduler (`make_scheduler`: DDIM, DPM-Solver++ or DDPM).
`save_pretrained` / `from_pretrained` round-trip it (config JSON + safetensors).

Modes, all through one `__call__`:

- **class**: start from noise, denoise with the class label and classifier-free guidance.
- **exemplar** (SDEdit): noise `init_images` to the timestep that `strength` selects
  (`scheduler.add_noise`) and denoise from there with the class label; strength 0 returns the
  exemplars, strength 1 is the class mode.
- **guided**: as class mode, plus the gradient of a caller's classifier on the predicted clean image,
  pushing each image toward the classifier's decision boundary for its intended class. The
  objective is `-relu(margin)`, margin = logit of the intended class minus the best other logit, so
  the push stops once an image reaches the boundary. The gradient g is taken on the predicted x0
  only (not through the UNet) and normalised to unit RMS per image; it moves x0 by
  `classifier_scale * sqrt(1 - alpha_bar_t) * g` at each step, which is `eps - scale * sqrt(alpha_bar_t) * g`
  for an epsilon model and `v - scale * g` for a v-prediction model.

Randomness only through the `generator` argument; with one `torch.Generator` per image, an image
does not depend on which other images share its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    ImagePipelineOutput,
    UNet2DModel,
)
from diffusers.utils.torch_utils import randn_tensor

SAMPLERS = ("ddim", "dpmsolver++", "ddpm")
ClassifierFn = Callable[[torch.Tensor], torch.Tensor]


def make_scheduler(sampler: str, train_config: Any) -> Any:
    """The sampling scheduler `sampler` on the training noise schedule (`train_config`: a scheduler config)."""
    if sampler == "ddim":
        # trailing spacing starts few-step sampling at the last training timestep (pure noise)
        return DDIMScheduler.from_config(train_config, timestep_spacing="trailing", clip_sample=True)
    if sampler == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(train_config, algorithm_type="dpmsolver++", solver_order=2,
                                                       timestep_spacing="trailing", lower_order_final=True,
                                                       thresholding=True, sample_max_value=1.0)
    if sampler == "ddpm":
        return DDPMScheduler.from_config(train_config, timestep_spacing="trailing", clip_sample=True)
    raise ValueError(f"sampler {sampler!r} is not one of {list(SAMPLERS)}")


def margin_objective(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-image `-relu(logit[y] - max_{j != y} logit[j])`: rises as an image nears the boundary, flat past it."""
    own = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    return -torch.relu(own - others)


class ClassConditionalPipeline(DiffusionPipeline):
    """Class-conditional sampling (class, exemplar/SDEdit and classifier-guided) with a `UNet2DModel`."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def null_class(self) -> int:
        return int(self.unet.config.num_class_embeds) - 1

    def check_inputs(self, labels: torch.Tensor, generator: Any, num_inference_steps: int, guidance_scale: float,
                     init_images: Any, strength: float | None, classifier_fn: Any, classifier_scale: float,
                     output_type: str) -> None:
        n_classes = self.null_class
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError(f"class_labels must be a non-empty 1-D sequence, got shape {tuple(labels.shape)}")
        if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
            raise ValueError(f"class_labels must lie in 0..{n_classes - 1}, got {labels.tolist()}")
        if isinstance(generator, list) and len(generator) != len(labels):
            raise ValueError(f"got {len(generator)} generators for {len(labels)} images; pass one per image")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if init_images is not None:
            if strength is None or not 0.0 <= strength <= 1.0:
                raise ValueError(f"strength must be in [0, 1] with init_images, got {strength!r}")
            cfg = self.unet.config
            want = (len(labels), cfg.in_channels, cfg.sample_size, cfg.sample_size)
            if tuple(init_images.shape) != want:
                raise ValueError(f"init_images must have shape {want}, got {tuple(init_images.shape)}")
        elif strength is not None:
            raise ValueError(f"strength={strength} needs init_images (exemplar mode)")
        if classifier_scale < 0:
            raise ValueError(f"classifier_scale must be >= 0, got {classifier_scale}")
        if classifier_scale > 0 and classifier_fn is None:
            raise ValueError(f"classifier_scale={classifier_scale} needs a classifier_fn")
        if output_type not in ("np", "pt"):
            raise ValueError(f"output_type must be 'np' or 'pt', got {output_type!r}")

    def __call__(self, class_labels: Sequence[int] | np.ndarray | torch.Tensor, *,
                 generator: torch.Generator | list[torch.Generator] | None = None, num_inference_steps: int = 20,
                 guidance_scale: float = 1.0, init_images: np.ndarray | torch.Tensor | None = None,
                 strength: float | None = None, classifier_fn: ClassifierFn | None = None,
                 classifier_scale: float = 0.0, output_type: str = "np") -> ImagePipelineOutput:
        """Sample one image per label; images come back N×C×H×W in [0, 1] (float32 numpy, or a tensor for 'pt').

        `init_images` (N×C×H×W in [0, 1]) with `strength` selects the exemplar mode; `classifier_fn`
        (N×C×H×W in [0, 1] → logits N×K, differentiable) with `classifier_scale > 0` the guided mode.
        """
        labels = torch.as_tensor(np.asarray(class_labels), dtype=torch.long).reshape(-1) \
            if not isinstance(class_labels, torch.Tensor) else class_labels.long().reshape(-1)
        if init_images is not None:
            init_images = torch.as_tensor(init_images, dtype=torch.float32)
        self.check_inputs(labels, generator, num_inference_steps, guidance_scale, init_images, strength,
                          classifier_fn, classifier_scale, output_type)
        guided = classifier_fn is not None and classifier_scale > 0
        # inference_mode tensors cannot enter autograd, which the guided mode needs
        context = torch.no_grad() if guided else torch.inference_mode()
        with context:
            images = self._sample(labels, generator, num_inference_steps, guidance_scale, init_images, strength,
                                  classifier_fn if guided else None, classifier_scale)
        images = (images / 2 + 0.5).clamp(0, 1).float()
        if output_type == "np":
            images = images.cpu().numpy()
        return ImagePipelineOutput(images=images)

    def _sample(self, labels: torch.Tensor, generator: Any, steps: int, guidance_scale: float,
                init_images: torch.Tensor | None, strength: float | None, classifier_fn: ClassifierFn | None,
                classifier_scale: float) -> torch.Tensor:
        unet, scheduler = self.unet, self.scheduler
        device, dtype = unet.device, unet.dtype
        channels_last = device.type == "cuda"
        labels = labels.to(device)
        n, cfg = len(labels), unet.config
        shape = (n, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        scheduler.set_timesteps(steps, device=device)
        timesteps = scheduler.timesteps
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if init_images is None:
            sample = noise * scheduler.init_noise_sigma
        else:
            init = init_images.to(device=device, dtype=dtype) * 2 - 1
            t_start = steps - min(int(steps * strength), steps)
            timesteps = timesteps[t_start * scheduler.order:]
            if len(timesteps) == 0:
                return init
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(t_start * scheduler.order)
            sample = scheduler.add_noise(init, noise, timesteps[:1].repeat(n))

        do_cfg = guidance_scale != 1.0
        null = torch.full_like(labels, self.null_class)
        model_labels = torch.cat([labels, null]) if do_cfg else labels
        alphas_cumprod = scheduler.alphas_cumprod.to(device)
        prediction = scheduler.config.prediction_type
        if classifier_fn is not None and prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"guided sampling supports epsilon or v_prediction models, not {prediction!r}")
        for t in self.progress_bar(timesteps):
            model_in = torch.cat([sample, sample]) if do_cfg else sample
            model_in = scheduler.scale_model_input(model_in, t)
            if channels_last:
                model_in = model_in.contiguous(memory_format=torch.channels_last)
            out = unet(model_in, t, class_labels=model_labels).sample.float()
            if do_cfg:
                cond, uncond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            if classifier_fn is not None:
                a, x = alphas_cumprod[int(t)].float(), sample.float()
                if prediction == "epsilon":
                    x0 = (x - (1 - a).sqrt() * out) / a.sqrt()
                    out = out - classifier_scale * a.sqrt() * _boundary_gradient(classifier_fn, x0, labels)
                else:  # v = sqrt(a) eps - sqrt(1 - a) x0: the same shift of x0 is simply v - scale * g
                    x0 = a.sqrt() * x - (1 - a).sqrt() * out
                    out = out - classifier_scale * _boundary_gradient(classifier_fn, x0, labels)
            sample = scheduler.step(out.to(dtype), t, sample, generator=generator).prev_sample
        return sample

    def set_sampler(self, sampler: str) -> None:
        """Swap the sampling scheduler, keeping the noise schedule the UNet was trained on."""
        self.register_modules(scheduler=make_scheduler(sampler, self.scheduler.config))


def _boundary_gradient(classifier_fn: ClassifierFn, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Unit-RMS gradient (per image) of the margin objective w.r.t. the predicted clean image x0 in [-1, 1]."""
    with torch.enable_grad():
        x = x0.detach().clamp(-1, 1).requires_grad_(True)
        logits = classifier_fn((x + 1) / 2)
        if logits.ndim != 2 or logits.shape[0] != len(labels):
            raise ValueError(f"classifier_fn must return logits of shape (N, K) with N={len(labels)}, "
                             f"got {tuple(logits.shape)}")
        (grad,) = torch.autograd.grad(margin_objective(logits.float(), labels).sum(), x)
    rms = grad.flatten(1).pow(2).mean(dim=1).sqrt().clamp_min(1e-12)
    return grad / rms.view(-1, *([1] * (grad.ndim - 1)))
