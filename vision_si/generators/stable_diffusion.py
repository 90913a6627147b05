"""Stable Diffusion backends (extra `sd`): `sd-txt2img`, `sd-img2img` and `sd-inpaint`.

For users who hold Stable-Diffusion-family weights (a local folder or a hub id, optionally with a
LoRA fine-tuned on their domain). Nothing is trained here: `fit` loads the pipeline and records the
data's channel count and size; `generate_batch` makes one image per (class, seed).

- `sd-txt2img` (mode `class`): `StableDiffusionPipeline` from the class's prompt.
- `sd-img2img` (mode `exemplar`): `StableDiffusionImg2ImgPipeline`; the exemplar is noised to
  `strength` and denoised with the class's prompt (the SDEdit of a text-to-image model).
- `sd-inpaint` (mode `exemplar`): `StableDiffusionInpaintPipeline` regenerates a box of the exemplar
  (for defects and lesions) with the class's prompt; `strength` 1 repaints the box from pure noise.
  The box comes from the preset's `mask`: `size` (side as a share of the image side, 0-1) and
  `position` `center` or `random` (placed uniformly at random, drawn from the image's own seed, so a
  manifest row regenerates its box). Pixels outside the box are the exemplar's own, exactly: the VAE
  round trip would otherwise blur the whole image.

A preset (see `generators/sd-img2img.yaml`):

```yaml
backend: sd-img2img
model: stable-diffusion-v1-5/stable-diffusion-v1-5   # a local pipeline folder or a hub id
lora: null                # optional LoRA weights (a .safetensors file or a folder), fused at lora_scale
resolution: 512           # the pipeline's working size (multiple of 8); null: the model's own
prompts:
  template: "an electroluminescence image of a {class_name} solar cell"
  classes: {defective: "..."}   # optional prompts by class name (here an ELPV class), replacing the template
  negative: "text, watermark"
sample: {sampler: default, steps: 30, guidance_scale: 7.5}
```

Template placeholders: `{class_name}`, `{class_words}` (the name with `-`/`_` as spaces), `{index}`.

Loading. `from_pretrained` never runs repository code (no `trust_remote_code`) and reads weights
from safetensors files only (`use_safetensors=True`: a folder with only pickled `.bin` weights is
refused, naming it; convert it with `save_pretrained`); with
`HF_HUB_OFFLINE=1` (or `TRANSFORMERS_OFFLINE=1`) it reads only local files (`local_files_only`), and
a local folder is always read as local files. The safety checker is off unless the preset sets
`safety_checker: true`: it is a classifier of natural photographs, meaningless on
electroluminescence, X-ray or microscopy images, and it blanks any image it flags, which would
silently turn candidates black.

Images. Exemplars (float32 C×H×W in [0, 1]) go to the pipeline as 8-bit RGB PIL images at its
resolution (grayscale repeated to three channels); outputs return at the data's size and channel
count (one channel: the luma weights of PIL's `convert("L")`). Image k is drawn from its own
`torch.Generator` (on the CPU, so the same seed gives the same image on any device) seeded with
`seeds[k]`. `checkpoint_sha256` covers the weights (LoRA fused in) and the class prompts, which
condition every image as much as the weights do. diffusers and transformers are imported when a pipeline is loaded, not with this module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vision_si.errors import ConfigError, DataError, InputError
from vision_si.generators.base import (
    MODES,
    PipelineGenerator,
    merge_preset_section,
    preset_check,
    register_generator,
    to_data_batch,
)

PIPELINES = {"sd-txt2img": "StableDiffusionPipeline", "sd-img2img": "StableDiffusionImg2ImgPipeline",
             "sd-inpaint": "StableDiffusionInpaintPipeline"}
TASK_MODES = {"sd-txt2img": ("class",), "sd-img2img": ("exemplar",), "sd-inpaint": ("exemplar",)}
SAMPLERS = ("default", "ddim", "pndm", "dpmsolver++", "euler", "euler-ancestral")
PROMPT_DEFAULTS: dict[str, Any] = {"template": "an image of a {class_words}", "classes": {}, "negative": ""}
SAMPLE_DEFAULTS: dict[str, Any] = {"sampler": "default", "steps": 30, "guidance_scale": 7.5}
MASK_DEFAULTS: dict[str, Any] = {"size": 0.5, "position": "center"}
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")
# the package is not on PyPI, so the extra is installed from a checkout
SD_INSTALL = "install the `sd` extra (`pip install -e '.[sd]'` in a checkout, or `make setup-dev`)"


def missing_modules(*, lora: bool = False) -> list[str]:
    """The modules a Stable Diffusion preset needs that are not installed, found without importing them.

    transformers holds the pipelines' text encoder and tokenizer; diffusers loads LoRA weights through peft.
    """
    wanted = ["diffusers", "transformers"] + (["peft"] if lora else [])
    return [m for m in wanted if importlib.util.find_spec(m) is None]


def import_sd() -> Any:
    """diffusers with transformers, or an `InputError` naming the extra to install."""
    try:
        import diffusers
        import transformers  # noqa: F401
    except ImportError as exc:
        raise InputError(f"the Stable Diffusion backends need {exc.name or 'transformers'}, which is not "
                         f"installed: {SD_INSTALL}") from None
    return diffusers


def offline_mode() -> bool:
    """True when the Hugging Face offline switches are set (read now, not at import time)."""
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return any(str(v).upper() in ("1", "ON", "YES", "TRUE") for v in flags if v)


def class_prompts(prompts: dict[str, Any], classes: list[str], preset: str) -> list[str]:
    """One prompt per class: its entry in `prompts['classes']`, else the template filled in."""
    per_class = prompts["classes"] or {}
    unknown = sorted(set(per_class) - set(classes))
    if unknown:
        raise ConfigError(f"generator preset {preset!r}: prompts.classes names {unknown}, not among the "
                          f"dataset's classes {classes}")
    out = []
    for index, name in enumerate(classes):
        if name in per_class:
            out.append(str(per_class[name]))
            continue
        try:
            out.append(str(prompts["template"]).format(class_name=name, index=index,
                                                       class_words=name.replace("-", " ").replace("_", " ")))
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"generator preset {preset!r}: prompts.template {prompts['template']!r} cannot be "
                              f"filled ({exc!r}); placeholders: {{class_name}}, {{class_words}}, {{index}}") from None
    return out


def box_mask(size: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """H×W float mask, 1 inside `box` = (top, left, bottom, right) given as shares of the image side."""
    h, w = size
    top, left, bottom, right = box
    mask = np.zeros((h, w), dtype=np.float32)
    mask[round(top * h):max(round(bottom * h), round(top * h) + 1),
         round(left * w):max(round(right * w), round(left * w) + 1)] = 1.0
    return mask


def mask_box(mask: dict[str, Any], seed: int) -> tuple[float, float, float, float]:
    """The inpainting box of one image: centred, or placed by a generator seeded with the image's seed."""
    side = float(mask["size"])
    if mask["position"] == "center":
        top = left = (1 - side) / 2
    else:
        top, left = np.random.default_rng(seed).uniform(0, 1 - side, size=2)
    return float(top), float(left), float(top) + side, float(left) + side


def weights_sha256(modules: dict[str, Any]) -> str:
    """sha256 over the named modules' weights (names, dtypes, shapes and bytes), streamed tensor by tensor."""
    import torch

    h = hashlib.sha256()
    for name in sorted(modules):
        for key, value in sorted(modules[name].state_dict().items()):
            t = value.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}.{key}:{t.dtype}:{tuple(value.shape)};".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class StableDiffusionGenerator(PipelineGenerator):
    """A Stable Diffusion pipeline behind the `Generator` protocol; `task` picks the pipeline.

    Parameters are the preset's keys (module doc). `device` 'auto' is CUDA when present; `dtype`
    'auto' is float16 on CUDA and float32 on the CPU.
    """

    task = "sd-txt2img"

    def __init__(self, name: str = "custom", model: str | None = None, revision: str | None = None,
                 variant: str | None = None, lora: str | None = None, lora_scale: float = 1.0,
                 resolution: int | None = None, prompts: dict[str, Any] | None = None,
                 sample: dict[str, Any] | None = None, mask: dict[str, Any] | None = None,
                 safety_checker: bool = False, device: str = "auto", dtype: str = "auto") -> None:
        self.name = name
        self.model = model
        self.revision = revision
        self.variant = variant
        self.lora = lora
        self.lora_scale = lora_scale
        self.resolution = resolution
        self.prompts = prompts
        self.sample = sample
        self.mask = mask
        self.safety_checker = safety_checker
        self.device = device
        self.dtype = dtype

    @property
    def modes(self) -> tuple[str, ...]:
        """Targeting modes this backend can make."""
        return TASK_MODES[self.task]

    def check_dependencies(self) -> None:
        """Refuse a preset whose modules are not installed (a `ConfigError` naming the extra), before any work."""
        missing = missing_modules(lora=bool(self.lora))
        if missing:
            raise ConfigError(f"generator preset {self.name!r} (backend {self.task}) needs {', '.join(missing)}, "
                              f"which is not installed: {SD_INSTALL}")

    # ------------------------------------------------------------------ settings
    def settings(self) -> dict[str, Any]:
        """The preset with defaults filled in, checked; raises `ConfigError` naming the bad key."""
        p = self.name
        prompts = merge_preset_section("prompts", self.prompts, PROMPT_DEFAULTS, p)
        sample = merge_preset_section("sample", self.sample, SAMPLE_DEFAULTS, p)
        if self.task != "sd-inpaint" and self.mask is not None:
            raise ConfigError(f"generator preset {p!r}: 'mask' applies to backend sd-inpaint only, not {self.task}")
        mask = merge_preset_section("mask", self.mask, MASK_DEFAULTS, p)
        preset_check(isinstance(self.model, str) and bool(self.model.strip()), p, "model", self.model,
               "a local pipeline folder or a hub id")
        preset_check(self.resolution is None or (isinstance(self.resolution, int) and 8 <= self.resolution <= 4096
                                           and self.resolution % 8 == 0), p, "resolution", self.resolution,
               "null or a multiple of 8 from 8 to 4096")
        preset_check(sample["sampler"] in SAMPLERS, p, "sample.sampler", sample["sampler"], ", ".join(SAMPLERS))
        preset_check(isinstance(sample["steps"], int) and sample["steps"] >= 1, p, "sample.steps", sample["steps"], ">= 1")
        preset_check(float(sample["guidance_scale"]) >= 0, p, "sample.guidance_scale", sample["guidance_scale"], ">= 0")
        preset_check(isinstance(prompts["template"], str), p, "prompts.template", prompts["template"], "a string")
        preset_check(isinstance(prompts["classes"], dict), p, "prompts.classes", prompts["classes"], "a class → prompt map")
        preset_check(0 < float(mask["size"]) <= 1, p, "mask.size", mask["size"], "0 < size <= 1, a share of the side")
        preset_check(mask["position"] in ("center", "random"), p, "mask.position", mask["position"], "center or random")
        preset_check(float(self.lora_scale) >= 0, p, "lora_scale", self.lora_scale, ">= 0")
        preset_check(self.device == "auto" or str(self.device).split(":")[0] in ("cpu", "cuda", "mps"), p, "device",
               self.device, "auto, cpu, cuda[:n] or mps")
        preset_check(self.dtype in ("auto", "float32", "float16", "bfloat16"), p, "dtype", self.dtype,
               "auto, float32, float16 or bfloat16")
        return {"model": self.model, "lora": self.lora, "resolution": self.resolution, "prompts": prompts,
                "sample": sample, "mask": mask}


    # ------------------------------------------------------------------ fit = load
    def fit(self, images: np.ndarray, labels: np.ndarray, classes: list[str], *, seed: int,
            cache_dir: str | Path | None = None, progress: bool = True) -> StableDiffusionGenerator:
        """Load the pipeline; `images` only fix the output's channels and size (nothing is trained)."""
        settings = self.settings()
        shape = np.shape(images)
        if len(shape) != 4 or shape[1] not in (1, 3):
            raise DataError(f"training images must be N×C×H×W with C 1 or 3, got shape {shape}")
        self.classes_ = list(classes)
        self.prompts_ = class_prompts(settings["prompts"], self.classes_, self.name)
        self.data_channels_, self.data_size_ = int(shape[1]), (int(shape[2]), int(shape[3]))
        self.cache_hit_ = False
        self._load_pipeline(settings)
        self.weights_sha256_ = self._weights_sha256()
        # the prompts condition every image as much as the weights do: an edited prompt is another
        # generator, so resumed jobs redo its images and `regenerate` refuses rows of the old one
        conditioning = json.dumps({"weights": self.weights_sha256_, "prompts": self.prompts_,
                                   "negative": settings["prompts"]["negative"]}, sort_keys=True)
        self.checkpoint_sha256_ = hashlib.sha256(conditioning.encode()).hexdigest()
        return self

    def _load_pipeline(self, settings: dict[str, Any]) -> None:
        diffusers = import_sd()
        import torch

        from vision_si.devices import resolve_device

        device = resolve_device(self.device, f"generator preset {self.name!r}: device")
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "auto": torch.float16 if device.type == "cuda" else torch.float32}[self.dtype]
        source = Path(str(self.model)).expanduser()
        local = source.is_dir()
        if not local and (str(self.model).startswith((".", "/", "~")) or source.exists()):
            raise DataError(f"generator preset {self.name!r}: model folder '{self.model}' not found "
                            "(a pipeline folder with model_index.json, or a hub id such as 'org/name')")
        offline = offline_mode()
        # use_safetensors: weights are read from safetensors files only, never from a pickled `.bin`
        kwargs: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": local or offline, "use_safetensors": True}
        if self.revision is not None:
            kwargs["revision"] = self.revision
        if self.variant is not None:
            kwargs["variant"] = self.variant
        if not self.safety_checker:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipeline_cls = getattr(diffusers, PIPELINES[self.task])
        try:
            with warnings.catch_warnings():  # `torch_dtype` is renamed `dtype` in new diffusers; old ones know only it
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                pipe = pipeline_cls.from_pretrained(str(source) if local else str(self.model), **kwargs)
        except (OSError, ValueError) as exc:
            where = "local folder" if local else ("hub id, offline: only the local hub cache is read" if offline
                                                 else "hub id")
            raise DataError(f"generator preset {self.name!r}: cannot load {PIPELINES[self.task]} from "
                            f"'{self.model}' ({where}): {str(exc).splitlines()[0]}") from None
        if settings["lora"]:
            self._load_lora(pipe, settings["lora"])
        if settings["sample"]["sampler"] != "default":
            pipe.scheduler = make_sd_scheduler(diffusers, settings["sample"]["sampler"], pipe.scheduler.config)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        self.pipeline_ = pipe

    def _load_lora(self, pipe: Any, lora: str) -> None:
        path = Path(lora).expanduser()
        if not path.exists():
            raise DataError(f"generator preset {self.name!r}: LoRA weights '{lora}' not found")
        folder, weight = (path.parent, path.name) if path.is_file() else (path, None)
        try:
            pipe.load_lora_weights(str(folder), weight_name=weight, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"generator preset {self.name!r}: cannot load LoRA weights '{lora}': "
                            f"{str(exc).splitlines()[0]}") from None
        # fused into the base weights, then the adapter layers dropped: sampling runs at full speed,
        # and the weights hash identifies base model, LoRA and scale together
        pipe.fuse_lora(lora_scale=float(self.lora_scale))
        pipe.unload_lora_weights()

    def _weights_sha256(self) -> str:
        import torch

        modules = {k: v for k, v in self.pipeline_.components.items() if isinstance(v, torch.nn.Module)}
        return weights_sha256(modules)

    @property
    def resolution_(self) -> int:
        """The pipeline's working size: the preset's, else the model's default."""
        self._check_fitted()
        if self.resolution is not None:
            return int(self.resolution)
        pipe = self.pipeline_
        return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)

    # ------------------------------------------------------------------ pickling (Ray actors)
    def __getstate__(self) -> dict[str, Any]:
        # ship parameters and fitted metadata, not gigabytes of weights: the receiver reloads the
        # pipeline from `model` (a shared folder or its own hub cache) and checks the weights hash
        return {k: v for k, v in self.__dict__.items() if k != "pipeline_"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "weights_sha256_" in state:
            self._load_pipeline(self.settings())
            got = self._weights_sha256()
            if got != state["weights_sha256_"]:
                raise DataError(f"generator preset {self.name!r}: the weights loaded from '{self.model}' here "
                                f"(sha256 {got[:12]}) differ from the sender's ({state['weights_sha256_'][:12]})")

    # ------------------------------------------------------------------ sample
    def generate_batch(self, class_indices: np.ndarray, seeds: list[int], *, mode: str,
                       exemplars: np.ndarray | None = None, strength: float = 0.5,
                       classifier_fn: Callable[..., Any] | None = None, classifier_scale: float = 0.0,
                       steps: int | None = None, guidance_scale: float | None = None) -> np.ndarray:
        """One image per class index, image k from `torch.Generator().manual_seed(seeds[k])`; N×C×H×W in [0, 1]."""
        import torch

        self._check_fitted()
        labels = np.asarray(class_indices, dtype=np.int64).reshape(-1)
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {list(MODES)}")
        if mode not in self.modes:
            raise ConfigError(f"generator {self.task} makes {' or '.join(self.modes)}-mode images, not {mode!r}; "
                              f"set generate.mode to {self.modes[0]!r} or use another preset")
        if len(seeds) != len(labels):
            raise ValueError(f"got {len(seeds)} seeds for {len(labels)} class indices; pass one per image")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes_)):
            raise ValueError(f"class indices must lie in 0..{len(self.classes_) - 1}, got {labels.tolist()}")
        steps = int(steps or self.steps)
        guidance = float(self.guidance_scale if guidance_scale is None else guidance_scale)
        if mode == "exemplar":
            want = (len(labels), self.data_channels_, *self.data_size_)
            if exemplars is None or tuple(np.shape(exemplars)) != want:
                got = None if exemplars is None else tuple(np.shape(exemplars))
                raise ValueError(f"exemplar mode needs exemplars of shape {want}, got {got}")
            exemplars = np.asarray(exemplars, dtype=np.float32)
            if strength == 0:
                return exemplars.copy()  # nothing is noised, so nothing changes
            if int(steps * strength) < 1:
                raise ConfigError(f"strength {strength} with {steps} steps leaves no denoising step "
                                  f"(int(steps × strength) = 0); raise the strength or sample.steps")
        if len(labels) == 0:
            return np.zeros((0, self.data_channels_, *self.data_size_), dtype=np.float32)
        settings = self.settings()
        res = self.resolution_
        negative = settings["prompts"]["negative"]
        call: dict[str, Any] = {
            "prompt": [self.prompts_[c] for c in labels],
            "negative_prompt": [negative] * len(labels) if negative else None,
            "num_inference_steps": steps, "guidance_scale": guidance, "output_type": "np",
            "generator": [torch.Generator().manual_seed(int(s)) for s in seeds],
        }
        masks = None
        if self.task == "sd-txt2img":
            call.update(height=res, width=res)
        elif self.task == "sd-img2img":
            call.update(image=[to_pil(x, res) for x in exemplars], strength=float(strength))
        else:
            boxes = [mask_box(settings["mask"], int(s)) for s in seeds]
            masks = np.stack([box_mask(self.data_size_, b) for b in boxes])[:, None]
            call.update(image=[to_pil(x, res) for x in exemplars], height=res, width=res, strength=float(strength),
                        mask_image=[pil_mask(box_mask((res, res), b)) for b in boxes])
        with torch.inference_mode():
            out = self.pipeline_(**call).images
        # output_type "np" gives N×H×W×3 float32 whatever the pipeline's dtype
        batch = torch.from_numpy(np.ascontiguousarray(np.asarray(out, dtype=np.float32).transpose(0, 3, 1, 2)))
        images = to_data_batch(batch, self.data_channels_, self.data_size_, resample="bicubic", gray_weights=LUMA)
        if masks is not None:
            images = masks * images + (1 - masks) * exemplars
        return images.astype(np.float32)


def make_sd_scheduler(diffusers: Any, sampler: str, config: Any) -> Any:
    """The sampler `sampler` on the model's own noise schedule (`config`: its scheduler config)."""
    classes = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "dpmsolver++": "DPMSolverMultistepScheduler",
               "euler": "EulerDiscreteScheduler", "euler-ancestral": "EulerAncestralDiscreteScheduler"}
    extra = {"algorithm_type": "dpmsolver++"} if sampler == "dpmsolver++" else {}
    return getattr(diffusers, classes[sampler]).from_config(config, **extra)


def to_pil(image: np.ndarray, size: int) -> Any:
    """C×H×W float in [0, 1] → 8-bit RGB PIL image of `size`×`size` (grayscale repeated)."""
    from PIL import Image

    arr = np.clip(np.round(np.asarray(image, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
    pil = Image.fromarray(arr[0], "L").convert("RGB") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0))
    return pil if pil.size == (size, size) else pil.resize((size, size), Image.Resampling.BICUBIC)


def pil_mask(mask: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray((mask * 255).astype(np.uint8), "L")


@register_generator("sd-txt2img")
class StableDiffusionText2Image(StableDiffusionGenerator):
    """Class mode with `StableDiffusionPipeline`: one prompt per class."""

    task = "sd-txt2img"


@register_generator("sd-img2img")
class StableDiffusionImg2Img(StableDiffusionGenerator):
    """Exemplar mode with `StableDiffusionImg2ImgPipeline`: exemplars noised to `strength`, denoised with the prompt."""

    task = "sd-img2img"


@register_generator("sd-inpaint")
class StableDiffusionInpaint(StableDiffusionGenerator):
    """Exemplar mode with `StableDiffusionInpaintPipeline`: a box of each exemplar regenerated with the prompt."""

    task = "sd-inpaint"


__all__ = ["StableDiffusionGenerator", "StableDiffusionImg2Img", "StableDiffusionInpaint",
           "StableDiffusionText2Image", "class_prompts", "import_sd", "mask_box", "missing_modules", "offline_mode"]
