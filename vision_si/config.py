"""Run configuration: nested dataclasses, YAML in and out, `--set a.b=value` overrides, validation.

One `RunConfig` holds a section per stage. Unknown keys are refused with the nearest valid key as a
suggestion; values are type-checked against the field annotations; ranges are checked by
`validate_config`. `config_to_dict` and `config_from_dict` round-trip exactly, so the resolved
`config.yaml` in a run directory reloads to an equal object.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from vision_si.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
# A wheel has no checkout: it carries configs/, data/ (cards) and generators/ (presets) here, mapped in
# from the repository root by pyproject.toml, so git holds each file once.
SHIPPED_ROOT = Path(__file__).resolve().parent / "_shipped"


@dataclass
class SplitConfig:
    test_fraction: float = 0.25
    val_fraction: float = 0.2  # share of what remains after `test` is taken out
    use_source_split: bool = False  # honour a split the source ships (MedMNIST .npz)
    group_by: str | None = None  # metadata key that groups samples (patient, module); None: source's own
    seed: int | None = None  # seed of the split alone (None: the run's seed), so seeds can vary over one split


DICOM_GROUP_PREFIX = "dicom:"  # split.group_by: dicom:PatientID groups by an attribute of each file's DICOM header


@dataclass
class DicomConfig:
    """How the grey values of a DICOM image become [0, 1] (vision_si/data/dicom.py; the `dicom` extra).

    Colour DICOM (RGB, YBR, palette) is scaled by its bit depth and never windowed.
    """

    # file: the file's first VOI LUT or window (WindowCenter/WindowWidth), else `bits`; bits: the whole range
    # the stored bits can hold, after RescaleSlope/Intercept; minmax: each image's own min..max; manual: center/width
    window: Literal["file", "bits", "minmax", "manual"] = "file"
    center: float | None = None  # window centre in modality units (HU for CT), with window: manual
    width: float | None = None  # window width (>= 1), with window: manual


@dataclass
class DataConfig:
    source: Literal["elpv", "imagefolder", "csv", "medmnist", "digits"] = "elpv"
    card: str | None = None  # dataset card YAML (data/elpv.yaml); its `data:` keys are defaults here
    root: str | None = None  # imagefolder root
    csv: str | None = None  # csv source: path,label[,group][,meta...]
    npz: str | None = None  # medmnist .npz file
    image_size: int = 32
    channels: int | None = None  # None: what the data has (grayscale stays 1)
    resize: Literal["resize", "resize_crop"] = "resize"
    alpha: Literal["drop", "composite_white", "composite_black"] = "composite_black"
    on_bad_image: Literal["error", "skip"] = "error"
    max_per_class: int | None = None  # cap per class (quick profiles); picked deterministically by seed
    augment: Literal["none", "light", "standard", "strong"] = "standard"
    cache_dir: str = ".cache/vision_si"
    split: SplitConfig = field(default_factory=SplitConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)


@dataclass
class ClassifierConfig:
    arch: str = "resnet18"
    pretrained: str = "none"  # none | hub | path to a local weights file (timm pretrained_cfg_overlay)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int = 300  # optimizer steps: the budget is fixed so rounds differ only by their data
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    label_smoothing: float = 0.1
    balanced_sampling: bool = True
    synthetic_share: float = 1.0  # at most this many synthetic draws per real draw of a class
    ema: bool = False
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    select_best_on_val: bool = False
    eval_every: int = 50
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 0
    predict_batch_size: int = 256


@dataclass
class DiagnoseConfig:
    cluster_method: Literal["gmm", "hdbscan"] = "gmm"
    max_clusters: int = 5
    min_slice_size: int = 5
    pca_dim: int = 32
    max_fit_samples: int = 20000  # fit clusters on a subsample, assign all
    confidence: float = 0.95
    n_bootstrap: int = 1000
    n_exemplars: int = 8
    budget_total: int = 200
    budget_floor: int = 0  # minimum images for every allocation that gets any
    budget_cap_fraction: float = 0.6  # no single allocation above this share of the total
    embedding_map: Literal["auto", "umap", "pca", "tsne"] = "auto"


@dataclass
class GenerateConfig:
    preset: str = "quick"  # a name in generators/ or a path to a preset YAML
    backend: str | None = None  # overrides the preset's backend
    mode: Literal["exemplar", "class", "guided"] = "exemplar"
    strength: float = 0.5  # exemplar mode: how far exemplars are noised (0 keeps them, 1 is pure noise)
    steps: int | None = None  # overrides the preset's sampling steps
    guidance_scale: float | None = None  # overrides the preset's classifier-free guidance
    classifier_scale: float = 1.0  # guided mode: weight of the classifier's gradient
    batch_size: int = 32
    engine: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    cache_dir: str = ".cache/vision_si/generators"
    # seed of the generator's training and cache key (None: the run's seed); fixed, runs with other seeds
    # (classifier seeds) share one trained generator. Image seeds always come from the run's seed.
    train_seed: int | None = None


FILTER_NAMES = ("fidelity", "informativeness", "realism", "memorisation", "duplicate")


@dataclass
class FilterConfig:
    critic: str = "round0"  # round0 | a timm arch name trained separately on real train data
    enabled: list[str] = field(default_factory=lambda: list(FILTER_NAMES))  # leakage is always on
    fidelity_min: float = 0.5
    informativeness_max: float = 0.95
    realism_k: int = 5
    realism_percentile: float = 99.0
    memorisation_cosine: float = 0.98
    memorisation_pixel: float = 0.95
    leak_cosine: float = 0.98
    leak_pixel: float = 0.95
    duplicate_cosine: float = 0.995
    duplicate_pixel: float = 0.98
    # Thresholds taken from the real data's own scores instead of the fixed values above (null: fixed).
    fidelity_percentile: float | None = 10.0  # fidelity_min := this percentile of the critic's true-class prob on real val
    memorisation_percentile: float | None = 99.0  # memorisation_* := this percentile of real train's nearest-other-real similarity
    leak_percentile: float | None = 99.0  # leak_* := this percentile of real train's nearest-other-real similarity
    realism_method: Literal["knn", "lof"] = "knn"  # realism threshold is always realism_percentile of real train's own scores
    pixel_size: int = 16  # images are area-averaged to this size before the pixel correlation


@dataclass
class GateConfig:
    enabled: bool = True  # false only for ablations: every filtered pool is accepted
    metric: Literal["macro_f1", "balanced_accuracy", "weak_class_recall"] = "macro_f1"
    min_delta: float = 0.0
    tolerance: float = 0.05  # largest allowed drop of any class's val recall
    # ...but never finer than this many val images of the class: with 16 val images of a class one image
    # moves its recall by 0.0625, so a 0.05 tolerance would call any single flip a regression (0 = off)
    tolerance_min_images: int = 1
    n_bootstrap: int = 1000
    confidence: float = 0.95
    seeds: int = 1  # models trained per side; decision on the paired mean
    # with seeds >= 2: resample seed pairs as well as val images, so the interval sees training noise
    bootstrap: Literal["images", "seeds_and_images"] = "seeds_and_images"
    # the lower bound must also clear this: a number, or "auto" = the between-seed sd of the per-seed deltas
    noise_floor: Any = 0.0


@dataclass
class LoopConfig:
    max_rounds: int = 2
    patience: int = 1
    on_reject: Literal["adapt", "repeat"] = "adapt"  # adapt: lower strength and budget next round


@dataclass
class TrackingConfig:
    """Experiment tracking (vision_si/tracking.py; the `tracking` extra). Nothing is logged unless asked."""

    mlflow: bool = False
    uri: str | None = None  # MLflow tracking URI; null: sqlite:///<the folder holding the run directory>/mlflow.db
    experiment: str = "vision_si"


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    # CPU threads for torch and the numeric libraries during the run; null keeps their default (all
    # cores). On a machine shared with other jobs, 1 stops OpenMP threads spinning against them
    # (benchmarks/threads.py measures the difference).
    threads: int | None = None
    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# --------------------------------------------------------------------------- conversion


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _suggest(key: str, allowed: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(sorted(allowed))}"


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; allow int where float is expected."""
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed here (expected {_type_name(inner)})")
    tp = inner
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _from_dict(tp, value, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = _suggest(str(value), [str(c) for c in choices])
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}{hint}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown key '{path}'{_suggest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any] | None, where: str = "") -> RunConfig:
    """Build a `RunConfig` from a plain mapping; unknown keys and wrong types raise `ConfigError`."""
    data = dict(data or {})
    data_section = data.get("data") or {}
    if isinstance(data_section, dict) and data_section.get("card"):
        data["data"] = {**_read_card(data_section["card"]), **data_section}
    cfg = _from_dict(RunConfig, data, where)
    validate_config(cfg)
    return cfg


def _read_card(card: str) -> dict[str, Any]:
    if not isinstance(card, str):  # read before the type checks of the data section
        raise ConfigError(f"data.card: expected a path to a dataset card YAML, got {card!r}")
    path = resolve_path(card)
    if not path.is_file():
        raise ConfigError(f"data.card: dataset card '{card}' not found")
    content = _read_yaml(path)
    section = content.get("data", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: 'data' must be a mapping of data keys")
    return section


def resolve_path(p: str | Path) -> Path:
    """A relative path is taken from the working directory, then the repository checkout, then the copy
    of `configs/`, `data/` and `generators/` installed with the package; not found anywhere: as given."""
    try:
        path = Path(p).expanduser()
    except RuntimeError:  # `~user` for a user that does not exist: taken literally, then not found
        path = Path(p)
    if path.is_absolute() or path.exists():
        return path
    for root in (REPO_ROOT, SHIPPED_ROOT):
        if (root / path).exists():
            return root / path
    return path


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(content).__name__}")
    return content


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` → (['a', 'b'], parsed value). Values are read as YAML scalars (1, 0.5, true, null)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides to a plain mapping; keys are checked against `RunConfig`."""
    data = _deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        cls: Any = RunConfig
        node = data
        for depth, key in enumerate(keys):
            names = [f.name for f in dataclasses.fields(cls)]
            path = ".".join(keys[: depth + 1])
            if key not in names:
                raise ConfigError(f"unknown key '{path}' in --set {text}{_suggest(key, names)}")
            tp = _is_optional(typing.get_type_hints(cls)[key])[1]
            if depth == len(keys) - 1:
                node[key] = value
            else:
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"'{path}' is a value, not a section (in --set {text})")
                node = node.setdefault(key, {})
                cls = tp
    return data


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a run config YAML (or the defaults when `path` is None) and apply overrides.

    A relative `path` is found as the CLI finds it (`resolve_path`): in the working directory, then
    the checkout, then the copy installed with the package.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = resolve_path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' not found")
        data = _read_yaml(p)
    data = apply_overrides(data, overrides)  # its errors name the --set text, not the file
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        if path is not None and not str(exc).startswith(str(path)):
            raise ConfigError(f"{path}: {exc}") from None
        raise


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is out of range ({allowed})")


def validate_config(cfg: RunConfig) -> None:
    """Range checks that the type system cannot express."""
    d, s, c = cfg.data, cfg.data.split, cfg.classifier
    _check(cfg.seed >= 0, "seed", cfg.seed, ">= 0")
    _check(bool(cfg.name.strip()) and "/" not in cfg.name and "\0" not in cfg.name and len(cfg.name) <= 100,
           "name", cfg.name, "non-empty, at most 100 characters, no '/' or NUL")
    _check(bool(cfg.output_dir) and "\0" not in cfg.output_dir, "output_dir", cfg.output_dir, "a folder path")
    _check(cfg.threads is None or 1 <= cfg.threads <= 1024, "threads", cfg.threads, "1 to 1024 or null")
    _check(8 <= d.image_size <= 1024, "data.image_size", d.image_size, "8 to 1024")
    _check(d.channels is None or d.channels in (1, 3), "data.channels", d.channels, "1, 3 or null")
    _check(d.max_per_class is None or d.max_per_class >= 3, "data.max_per_class", d.max_per_class, ">= 3")
    _check(0 < s.test_fraction < 0.9, "data.split.test_fraction", s.test_fraction, "0 < x < 0.9")
    _check(0 < s.val_fraction < 0.9, "data.split.val_fraction", s.val_fraction, "0 < x < 0.9")
    _check(s.seed is None or s.seed >= 0, "data.split.seed", s.seed, ">= 0 or null")
    if s.group_by is not None and s.group_by.startswith(DICOM_GROUP_PREFIX):
        _check(re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", s.group_by[len(DICOM_GROUP_PREFIX):]) is not None,
               "data.split.group_by", s.group_by, "dicom: followed by a DICOM keyword, e.g. dicom:PatientID")
    w = d.dicom
    if w.window == "manual":
        _check(w.center is not None and w.width is not None, "data.dicom.window", w.window,
               "manual needs data.dicom.center and data.dicom.width")
    else:
        _check(w.center is None and w.width is None, "data.dicom.center/width", [w.center, w.width],
               "set only with data.dicom.window: manual")
    _check(w.width is None or w.width >= 1, "data.dicom.width", w.width, ">= 1")
    _check(1 <= c.steps <= 10_000_000, "classifier.steps", c.steps, "1 to 10,000,000")
    _check(1 <= c.batch_size <= 65536, "classifier.batch_size", c.batch_size, "1 to 65536")
    _check(0 < c.lr <= 10, "classifier.lr", c.lr, "0 < x <= 10")
    _check(c.weight_decay >= 0, "classifier.weight_decay", c.weight_decay, ">= 0")
    _check(0 <= c.warmup_steps <= c.steps, "classifier.warmup_steps", c.warmup_steps, "0 to classifier.steps")
    _check(0 <= c.label_smoothing < 1, "classifier.label_smoothing", c.label_smoothing, "0 <= x < 1")
    _check(c.synthetic_share >= 0, "classifier.synthetic_share", c.synthetic_share, ">= 0")
    _check(0 < c.ema_decay < 1, "classifier.ema_decay", c.ema_decay, "0 < x < 1")
    _check(c.grad_clip >= 0, "classifier.grad_clip", c.grad_clip, ">= 0 (0 turns it off)")
    _check(c.eval_every >= 1, "classifier.eval_every", c.eval_every, ">= 1")
    _check(c.num_workers >= 0, "classifier.num_workers", c.num_workers, ">= 0")
    _check(c.predict_batch_size >= 1, "classifier.predict_batch_size", c.predict_batch_size, ">= 1")
    dev = c.device
    _check(dev in ("auto", "cpu", "cuda", "mps") or dev.startswith("cuda:"), "classifier.device", dev,
           "auto, cpu, cuda, cuda:N or mps")
    g = cfg.diagnose
    _check(1 <= g.max_clusters <= 50, "diagnose.max_clusters", g.max_clusters, "1 to 50")
    _check(g.min_slice_size >= 2, "diagnose.min_slice_size", g.min_slice_size, ">= 2")
    _check(g.pca_dim >= 2, "diagnose.pca_dim", g.pca_dim, ">= 2")
    _check(g.max_fit_samples >= 100, "diagnose.max_fit_samples", g.max_fit_samples, ">= 100")
    _check(0.5 <= g.confidence < 1, "diagnose.confidence", g.confidence, "0.5 <= x < 1")
    _check(100 <= g.n_bootstrap <= 100_000, "diagnose.n_bootstrap", g.n_bootstrap, "100 to 100,000")
    _check(g.n_exemplars >= 1, "diagnose.n_exemplars", g.n_exemplars, ">= 1")
    _check(0 <= g.budget_total <= 1_000_000, "diagnose.budget_total", g.budget_total, "0 to 1,000,000")
    _check(g.budget_floor >= 0, "diagnose.budget_floor", g.budget_floor, ">= 0")
    _check(0 < g.budget_cap_fraction <= 1, "diagnose.budget_cap_fraction", g.budget_cap_fraction, "0 < x <= 1")
    n = cfg.generate
    _check(0 <= n.strength <= 1, "generate.strength", n.strength, "0 to 1")
    _check(n.steps is None or 1 <= n.steps <= 5000, "generate.steps", n.steps, "1 to 5000")
    _check(n.guidance_scale is None or n.guidance_scale >= 0, "generate.guidance_scale", n.guidance_scale, ">= 0")
    _check(n.classifier_scale >= 0, "generate.classifier_scale", n.classifier_scale, ">= 0")
    _check(1 <= n.batch_size <= 4096, "generate.batch_size", n.batch_size, "1 to 4096")
    _check(n.train_seed is None or n.train_seed >= 0, "generate.train_seed", n.train_seed, ">= 0 or null")
    f = cfg.filter
    for name in f.enabled:
        if name not in FILTER_NAMES:
            raise ConfigError(f"filter.enabled: unknown filter '{name}'{_suggest(name, FILTER_NAMES)}"
                              + ("; leakage cannot be switched off" if name == "leakage" else ""))
    for key in ("fidelity_min", "informativeness_max", "memorisation_cosine", "memorisation_pixel",
                "leak_cosine", "leak_pixel", "duplicate_cosine", "duplicate_pixel"):
        v = getattr(f, key)
        _check(0 <= v <= 1, f"filter.{key}", v, "0 to 1")
    _check(f.realism_k >= 1, "filter.realism_k", f.realism_k, ">= 1")
    _check(50 <= f.realism_percentile <= 100, "filter.realism_percentile", f.realism_percentile, "50 to 100")
    _check(f.fidelity_percentile is None or 0 <= f.fidelity_percentile <= 50, "filter.fidelity_percentile",
           f.fidelity_percentile, "0 to 50, or null")
    _check(f.memorisation_percentile is None or 50 <= f.memorisation_percentile <= 100,
           "filter.memorisation_percentile", f.memorisation_percentile, "50 to 100, or null")
    _check(f.leak_percentile is None or 50 <= f.leak_percentile <= 100,
           "filter.leak_percentile", f.leak_percentile, "50 to 100, or null")
    _check(2 <= f.pixel_size <= 256, "filter.pixel_size", f.pixel_size, "2 to 256")
    t = cfg.gate
    _check(-1 <= t.min_delta <= 1, "gate.min_delta", t.min_delta, "-1 to 1")
    _check(0 <= t.tolerance <= 1, "gate.tolerance", t.tolerance, "0 to 1")
    _check(isinstance(t.tolerance_min_images, int) and t.tolerance_min_images >= 0, "gate.tolerance_min_images",
           t.tolerance_min_images, "an integer >= 0")
    _check(100 <= t.n_bootstrap <= 100_000, "gate.n_bootstrap", t.n_bootstrap, "100 to 100,000")
    _check(0.5 <= t.confidence < 1, "gate.confidence", t.confidence, "0.5 <= x < 1")
    _check(1 <= t.seeds <= 20, "gate.seeds", t.seeds, "1 to 20")
    nf = t.noise_floor
    _check(nf == "auto" or (isinstance(nf, (int, float)) and not isinstance(nf, bool) and 0 <= nf <= 1),
           "gate.noise_floor", nf, "'auto' or a number from 0 to 1")
    lp = cfg.loop
    _check(0 <= lp.max_rounds <= 100, "loop.max_rounds", lp.max_rounds, "0 to 100")
    _check(lp.patience >= 1, "loop.patience", lp.patience, ">= 1")
    tr = cfg.tracking
    _check(tr.uri is None or bool(tr.uri.strip()), "tracking.uri", tr.uri, "a tracking URI or null")
    _check(bool(tr.experiment.strip()) and len(tr.experiment) <= 250, "tracking.experiment", tr.experiment,
           "a non-empty name of at most 250 characters")
