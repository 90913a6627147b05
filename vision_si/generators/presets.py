"""Generator presets: YAML files in the repository's `generators/` folder, selectable by name.

An installed wheel carries that folder inside the package (`vision_si/_shipped/generators/`); `PRESET_DIR`
is the checkout's folder when there is a checkout, else that copy.

A preset names its `backend` (a registered generator) and that backend's settings; the `ddpm`
presets look like this (see `generators/quick.yaml`):

```yaml
backend: ddpm
resolution: 32          # the generator's working size; images return at the data's size
channels: auto          # auto: the data's own (grayscale stays 1), or 1 / 3
unet: {block_out_channels: [32, 64, 64], layers_per_block: 1, attention: false, norm_num_groups: 16}
train: {steps: 600, batch_size: 32, lr: 0.002, warmup_steps: 50, ema_decay: 0.999, cfg_dropout: 0.1,
        class_balance: 0.5, augment: {hflip: true, vflip: true}, checkpoint_every: 200}
sample: {sampler: dpmsolver++, steps: 15, guidance_scale: 2.0}
```

`load_preset(name_or_path)` reads one and adds `name` (the file's stem); `resolve_preset(cfg)`
applies a `GenerateConfig`'s overrides (`backend`, `steps`, `guidance_scale`); `check_preset(preset)`
refuses, before a run does any work, a preset whose backend is unknown, does not take one of its
keys, or needs modules that are not installed (a backend's optional `check_dependencies()`).

The seed a generator trains with is not a preset key: it is the run's seed, or `generate.train_seed`
when set (a trained `ddpm` generator is cached by data, training settings and that seed, so a fixed
`train_seed` lets runs with different seeds reuse one generator instead of training one each).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from vision_si.config import REPO_ROOT, SHIPPED_ROOT, GenerateConfig, parse_yaml, read_text_file, resolve_path
from vision_si.errors import ConfigError
from vision_si.generators.base import create_generator


def _preset_dir() -> Path:
    """The checkout's `generators/`; an installed wheel has no checkout, so the copy inside the package."""
    in_repo = REPO_ROOT / "generators"
    # pyproject.toml marks a checkout: in a wheel install REPO_ROOT is site-packages, where a folder named
    # `generators` may belong to another distribution
    is_checkout = (REPO_ROOT / "pyproject.toml").is_file() and in_repo.is_dir()
    return in_repo if is_checkout else SHIPPED_ROOT / "generators"


PRESET_DIR = _preset_dir()


def list_presets() -> list[str]:
    """Names of the presets in `PRESET_DIR` (`<repo>/generators/`, or its copy in an installed wheel)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name_or_path: str | Path) -> dict[str, Any]:
    """A preset as a plain dict with `name` set; a bare name is looked up in `PRESET_DIR`."""
    text = str(name_or_path)
    looks_like_path = text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text
    if looks_like_path:
        path = resolve_path(text)
        if not path.is_file():
            raise ConfigError(f"generator preset file '{text}' not found")
    else:
        path = PRESET_DIR / f"{text}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown generator preset {text!r}; known: {', '.join(list_presets()) or 'none'}"
                              f" (or give a path to a preset YAML)")
    content = parse_yaml(read_text_file(path, "generator preset file"), str(path))
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: a generator preset must be a mapping, got {type(content).__name__}")
    if not isinstance(content.get("backend"), str):
        raise ConfigError(f"{path}: missing 'backend' (a generator name such as 'ddpm')")
    content.setdefault("name", path.stem)
    return content


def resolve_preset(cfg: GenerateConfig) -> dict[str, Any]:
    """The preset `cfg.preset` with the config's overrides applied (`backend`, `steps`, `guidance_scale`)."""
    preset = copy.deepcopy(load_preset(cfg.preset))
    if cfg.backend is not None:
        preset["backend"] = cfg.backend
    sample = preset.setdefault("sample", {})
    if not isinstance(sample, dict):
        raise ConfigError(f"generator preset {preset['name']!r}: 'sample' must be a mapping")
    if cfg.steps is not None:
        sample["steps"] = cfg.steps
    if cfg.guidance_scale is not None:
        sample["guidance_scale"] = cfg.guidance_scale
    return preset


def generator_kwargs(preset: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for `create_generator(preset['backend'], **kwargs)`: every key but `backend`."""
    return {k: copy.deepcopy(v) for k, v in preset.items() if k != "backend"}


def check_preset(preset: dict[str, Any]) -> None:
    """Raise `ConfigError` now for what would otherwise stop a run after round 0's training.

    Builds the backend from the preset (cheap: a generator's `__init__` only stores its keys), which
    refuses an unknown backend or key, then calls the backend's `check_dependencies()` when it has
    one (the Stable Diffusion backends name their extra there).
    """
    generator = create_generator(preset["backend"], **generator_kwargs(preset))
    check = getattr(generator, "check_dependencies", None)
    if callable(check):
        check()
