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
    # a text file of train ids to keep, one per line: the split is made on all the data first, then the train
    # images not listed are left out of the run (learning curves on a subsample; val and test unchanged)
    train_ids: str | None = None


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
    augment: Literal["none", "flips", "light", "standard", "strong"] = "standard"
    cache_dir: str = ".cache/vision_si"
    # a folder of images without labels (any depth, any supported format) that only the self-supervised
    # pretraining reads (pretrain:); a copy of a val/test image found in it is left out, and said so
    unlabelled: str | None = None
    split: SplitConfig = field(default_factory=SplitConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)


@dataclass
class ClassifierConfig:
    arch: str = "resnet18"
    # none | hub | ssl (this run's self-supervised encoder, pretrain:) | path to a local weights file (timm
    # pretrained_cfg_overlay, or an encoder's model.safetensors)
    pretrained: str = "none"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int = 300  # optimizer steps: the budget is fixed so rounds differ only by their data
    # the budget in epochs of the *real* training images instead (steps = ceil(epochs * n_real / batch_size));
    # synthetic images come in extra batch slots, so a round with a pool trains as many steps as one without
    epochs: float | None = None
    batch_size: int = 64  # real draws per batch; synthetic slots come on top
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int | None = None  # None: 5 % of the steps
    label_smoothing: float = 0.1
    sampling: Literal["natural", "balanced", "sqrt"] = "balanced"  # class weights of the real draws
    # cross_entropy, or logit_adjusted (Menon et al. 2021): the loss adds tau * log(class prior of the
    # draws) to the logits, so the raw logits estimate a class-balanced posterior
    loss: Literal["cross_entropy", "logit_adjusted"] = "cross_entropy"
    logit_adjust_tau: float = 1.0
    synthetic_share: float = 1.0  # at most this many synthetic draws per real draw of a class
    ema: bool = False
    ema_decay: float = 0.995
    # re-estimate the BatchNorm statistics of the final weights on the clean (unaugmented) real training
    # images: the running averages of training lag behind the last weights and see augmented images
    bn_recalibrate: bool = True
    tta: bool = False  # predict with flips averaged (only where orientation carries no label)
    grad_clip: float = 1.0
    select_best_on_val: bool = False
    eval_every: int = 50
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 0
    predict_batch_size: int = 256


PRETRAIN_CONSUMERS = ("classifier", "diagnosis", "filter")


@dataclass
class PretrainConfig:
    """Self-supervised encoder on the train split plus `data.unlabelled` (vision_si/pretrain.py; the
    `pretrain` extra, lightly). Never trained on val or test; cached by the sha256 of its inputs."""

    enabled: bool = False
    method: Literal["simclr", "vicreg"] = "simclr"
    epochs: float = 30.0  # passes over the pretraining images (train split + unlabelled), fractions allowed
    batch_size: int = 64  # images per step; each gives two augmented views
    lr: float = 1e-3  # AdamW, linear warm-up over the first 5 % of steps then cosine decay
    weight_decay: float = 1e-4
    temperature: float = 0.2  # NT-Xent temperature (simclr)
    image_size: int | None = None  # null: data.image_size
    crop_min_scale: float = 0.35  # random resized crop keeps 35-100 % of the image area
    flips: bool | None = None  # flips and 90-degree turns in the views; null: as data.augment allows (standard/strong)
    checkpoint_every: int = 50  # steps between resume checkpoints (<cache_dir>/<key>.partial/)
    seed: int | None = None  # seed of the pretraining (None: the run's); fixed, runs of several seeds share one encoder
    cache_dir: str = ".cache/vision_si/encoders"
    # who uses the encoder: the classifier starts from it (unless classifier.pretrained names weights of
    # the user's, which stay the first choice); the diagnosis and the filter get its label-free embeddings
    use_for: list[str] = field(default_factory=lambda: list(PRETRAIN_CONSUMERS))


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
    # out-of-fold judgement of train images (vision_si.oof): K classifiers cross-fitted over train with the
    # classifier's recipe, each predicting the fold it did not train on; 0 is off (val alone is judged)
    oof_folds: int = 0
    oof_epochs: float | None = None  # each fold model's budget in epochs of its real images (None: the recipe's)
    # re-clusterings on subsamples that measure each slice's stability (0: off, no stability recorded)
    stability_resamples: int = 0


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


# The filters in priority order: a candidate's reason is the first enabled filter it fails (safety first,
# then quality, then redundancy). `vision_si.filter` reads its PRIORITY from here, so the list has one home.
FILTER_PRIORITY = ("leakage", "memorisation", "fidelity", "realism", "duplicate", "informativeness")
FILTER_NAMES = tuple(name for name in FILTER_PRIORITY if name != "leakage")  # those `enabled` may name


@dataclass
class FilterConfig:
    # the frozen critic that judges fidelity and embeds every image: round 0's baseline model, trained on
    # real train data only and never retrained (the one critic so far; the loop reads this key)
    critic: Literal["round0"] = "round0"
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
    """The paired retrain-and-compare decision (vision_si.gate). Fixed before the round; see docs/internals.md."""

    enabled: bool = True  # false only for ablations: every filtered pool is accepted
    admit: Literal["superiority", "non_inferiority"] = "superiority"  # which question admits a pool
    # primary metric on the judging images, from the whole predicted distribution after calibration
    metric: Literal["macro_auroc", "log_loss", "macro_f1", "balanced_accuracy"] = "macro_auroc"
    min_delta: float = 0.0  # superiority: the lower end of the improvement must be above this
    margin: float = 0.01  # non-inferiority: ... above -margin (in units of the metric)
    f1_margin: float = 0.03  # check: macro-F1 (balanced decisions) may not be worse by more than this
    tolerance: float = 0.05  # check: largest allowed drop of any class's recall on the judging images
    # ...but never finer than this many judging images of the class (a single flipped image is not a regression)
    tolerance_min_images: int = 1
    n_bootstrap: int = 1000  # paired image resamples for the image part of the interval
    confidence: float = 0.95  # two-sided; its one-sided half is spent over the looks
    seeds_per_look: int = 3  # paired seeds added before each look
    max_seeds: int = 9  # the last look; the design (looks at 3, 6, 9) is fixed before any number is seen
    judge_fraction: float = 0.5  # share of val that judges; the rest selects (exemplars, thresholds, calibration)
    start: Literal["warm", "scratch"] = "warm"  # warm: both sides fine-tune the current model; scratch: full recipe
    finetune_epochs: float = 2.0  # warm start: epochs of the real training images per side
    finetune_lr: float | None = None  # warm start: peak learning rate (None: classifier.lr / 4)

    def look_schedule(self) -> list[int]:
        """Seed counts at which the gate looks: seeds_per_look, 2*seeds_per_look, ..., max_seeds."""
        looks = list(range(self.seeds_per_look, self.max_seeds, self.seeds_per_look))
        return looks + [self.max_seeds]


@dataclass
class LoopConfig:
    max_rounds: int = 2
    patience: int = 1
    on_reject: Literal["adapt", "repeat"] = "adapt"  # adapt: lower strength and budget next round
    # after k rejected rounds in a row (on_reject: adapt), a round asks for count × budget_factor^k images
    # of each allocation, at exemplar strength × strength_factor^k (variations closer to the exemplars)
    adapt_budget_factor: float = 0.5
    adapt_strength_factor: float = 0.7


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
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
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
    if not path.exists():
        raise ConfigError(f"data.card: dataset card '{card}' not found")
    content = _read_yaml(path, "data.card: dataset card")
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


# Bounds on what a YAML or JSON input may expand to: a run config has about 150 nodes and a depth of
# 4; a plan file grows with its requests. An alias bomb (anchors of anchors) of a few hundred bytes
# expands to billions of nodes when copied; deep nesting exhausts the recursion of every reader.
MAX_INPUT_NODES = 100_000
MAX_INPUT_DEPTH = 50


def _too_big(where: str, what: str) -> ConfigError:
    return ConfigError(f"{where}: {what}; refused")


def _too_deep(where: str) -> ConfigError:
    return _too_big(where, f"values nested more than {MAX_INPUT_DEPTH} deep")


def _too_many(where: str, aliases: bool = True) -> ConfigError:
    if not aliases:
        return _too_big(where, f"more than {MAX_INPUT_NODES:,} values")
    return _too_big(where, f"expands to more than {MAX_INPUT_NODES:,} values once its aliases are expanded "
                           "(an alias bomb)")


def _measure_node(node: Any, depth: int, memo: dict[int, tuple[int, int]], open_: set[int], where: str) -> tuple[int, int]:
    """(values, height) of a composed YAML node with every alias expanded; raises beyond the bounds.

    An alias is the same node object as its anchor, so the memo makes this linear in the document's
    size however large the expansion is.
    """
    key = id(node)
    if key in memo:
        size, height = memo[key]
    else:
        if key in open_:
            raise ConfigError(f"{where}: a recursive alias (an anchor that contains itself); refused")
        if depth > MAX_INPUT_DEPTH:
            raise _too_deep(where)
        open_.add(key)
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [x for pair in node.value for x in pair]
        else:
            children = []
        size, height = 1, 0
        for child in children:
            s, h = _measure_node(child, depth + 1, memo, open_, where)
            size, height = size + s, max(height, h + 1)
            if size > MAX_INPUT_NODES:
                raise _too_many(where)
        open_.discard(key)
        memo[key] = (size, height)
    if depth + height > MAX_INPUT_DEPTH:
        raise _too_deep(where)
    return size, height


def parse_yaml(text: str, where: str) -> Any:
    """`yaml.safe_load` of `text`, refusing (`ConfigError` naming `where`) alias bombs and deep nesting.

    The nesting depth is read from the event stream (PyYAML's parser does not recurse, its composer
    does), then the composed node graph is measured with aliases expanded, and only then is it
    constructed into Python objects.
    """
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_INPUT_DEPTH:
                    raise _too_deep(where)
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _measure_node(node, 1, {}, set(), where)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {str(exc).splitlines()[0]}") from None


def check_plain_tree(value: Any, where: str) -> Any:
    """Refuse a parsed JSON/YAML value beyond the same bounds as `parse_yaml` (iteratively, no recursion)."""
    count, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        count += 1
        if depth > MAX_INPUT_DEPTH:
            raise _too_deep(where)
        if count > MAX_INPUT_NODES:
            raise _too_many(where, aliases=False)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for pair in item.items() for v in pair)
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return value


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of an input file; a missing file, a folder or other bytes are a `ConfigError`."""
    if path.is_dir():
        raise ConfigError(f"{what} '{path}' is a folder, not a file")
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _read_yaml(path: Path, what: str = "file") -> dict[str, Any]:
    content = parse_yaml(read_text_file(path, what), str(path))
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
        value = parse_yaml(raw, f"--set {key}") if raw.strip() else ""
    except ConfigError as exc:
        if "not valid YAML" not in str(exc):
            raise  # an alias bomb or deep nesting: refused, not taken as a string
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
        data = _read_yaml(resolve_path(path), "config file")
    data = apply_overrides(data, overrides)  # its errors name the --set text, not the file
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        if path is not None and not str(exc).startswith(str(path)):
            raise ConfigError(f"{path}: {exc}") from None
        raise


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write `cfg` as YAML, atomically (a kill never leaves half a config)."""
    from vision_si.rundir import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------- seeds derived from the run's seed


def split_seed(cfg: RunConfig) -> int:
    """The seed of the train/val/test split: `data.split.seed`, else the run's seed."""
    return cfg.seed if cfg.data.split.seed is None else cfg.data.split.seed


def model_seeds(seed: int, n: int) -> list[int]:
    """The seeds of the `n` models trained per side (`gate.seeds`): `seed + k` for the k-th; model k of
    every round trains with the same seed, so rounds differ only by their data."""
    return [seed + k for k in range(n)]


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
    _check(s.train_ids is None or (bool(s.train_ids.strip()) and "\0" not in s.train_ids), "data.split.train_ids",
           s.train_ids, "a text file of train ids, or null")
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
    _check(c.epochs is None or 0 < c.epochs <= 100_000, "classifier.epochs", c.epochs, "0 < x <= 100,000 or null")
    _check(c.warmup_steps is None or c.warmup_steps >= 0, "classifier.warmup_steps", c.warmup_steps, ">= 0 or null")
    _check(c.epochs is not None or c.warmup_steps is None or c.warmup_steps <= c.steps, "classifier.warmup_steps",
           c.warmup_steps, "0 to classifier.steps")
    _check(0 <= c.logit_adjust_tau <= 5, "classifier.logit_adjust_tau", c.logit_adjust_tau, "0 to 5")
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
    _check(c.pretrained != "ssl" or cfg.pretrain.enabled, "classifier.pretrained", c.pretrained,
           "'ssl' starts the classifier from this run's pretrained encoder: set pretrain.enabled: true")
    _check(c.pretrained != "ssl" or "classifier" in cfg.pretrain.use_for, "classifier.pretrained", c.pretrained,
           "'ssl' needs 'classifier' in pretrain.use_for")
    pt = cfg.pretrain
    _check(0 < pt.epochs <= 100_000, "pretrain.epochs", pt.epochs, "0 < x <= 100,000")
    _check(2 <= pt.batch_size <= 65536, "pretrain.batch_size", pt.batch_size, "2 to 65536 (contrastive pairs need two)")
    _check(0 < pt.lr <= 10, "pretrain.lr", pt.lr, "0 < x <= 10")
    _check(pt.weight_decay >= 0, "pretrain.weight_decay", pt.weight_decay, ">= 0")
    _check(0 < pt.temperature <= 10, "pretrain.temperature", pt.temperature, "0 < x <= 10")
    _check(pt.image_size is None or 8 <= pt.image_size <= 1024, "pretrain.image_size", pt.image_size,
           "8 to 1024, or null for data.image_size")
    _check(0 < pt.crop_min_scale <= 1, "pretrain.crop_min_scale", pt.crop_min_scale, "0 < x <= 1")
    _check(pt.seed is None or pt.seed >= 0, "pretrain.seed", pt.seed, ">= 0 or null")
    _check(pt.checkpoint_every >= 1, "pretrain.checkpoint_every", pt.checkpoint_every, ">= 1")
    _check(bool(pt.cache_dir.strip()) and "\0" not in pt.cache_dir, "pretrain.cache_dir", pt.cache_dir, "a folder path")
    for name in pt.use_for:
        if name not in PRETRAIN_CONSUMERS:
            raise ConfigError(f"pretrain.use_for: unknown consumer '{name}'{_suggest(name, PRETRAIN_CONSUMERS)}")
    _check(len(set(pt.use_for)) == len(pt.use_for), "pretrain.use_for", pt.use_for, "each consumer at most once")
    _check(d.unlabelled is None or bool(d.unlabelled.strip()), "data.unlabelled", d.unlabelled, "a folder or null")
    _check(d.unlabelled is None or pt.enabled, "data.unlabelled", d.unlabelled,
           "read only by the self-supervised pretraining: set pretrain.enabled: true, or leave it out")
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
    _check(g.oof_folds == 0 or 2 <= g.oof_folds <= 20, "diagnose.oof_folds", g.oof_folds, "0 (off) or 2 to 20")
    _check(g.oof_epochs is None or g.oof_epochs > 0, "diagnose.oof_epochs", g.oof_epochs, "null or > 0")
    _check(0 <= g.stability_resamples <= 200, "diagnose.stability_resamples", g.stability_resamples, "0 to 200")
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
    _check(0 <= t.margin <= 1, "gate.margin", t.margin, "0 to 1")
    _check(0 <= t.f1_margin <= 1, "gate.f1_margin", t.f1_margin, "0 to 1")
    _check(1 <= t.seeds_per_look <= 50, "gate.seeds_per_look", t.seeds_per_look, "1 to 50")
    _check(t.seeds_per_look <= t.max_seeds <= 100, "gate.max_seeds", t.max_seeds, "gate.seeds_per_look to 100")
    _check(0.1 <= t.judge_fraction <= 0.9, "gate.judge_fraction", t.judge_fraction, "0.1 to 0.9")
    _check(0 < t.finetune_epochs <= 1000, "gate.finetune_epochs", t.finetune_epochs, "0 < x <= 1000")
    _check(t.finetune_lr is None or 0 < t.finetune_lr <= 10, "gate.finetune_lr", t.finetune_lr, "0 < x <= 10 or null")
    lp = cfg.loop
    _check(0 <= lp.max_rounds <= 100, "loop.max_rounds", lp.max_rounds, "0 to 100")
    _check(lp.patience >= 1, "loop.patience", lp.patience, ">= 1")
    tr = cfg.tracking
    _check(tr.uri is None or bool(tr.uri.strip()), "tracking.uri", tr.uri, "a tracking URI or null")
    _check(bool(tr.experiment.strip()) and len(tr.experiment) <= 250, "tracking.experiment", tr.experiment,
           "a non-empty name of at most 250 characters")
    _check(0 < lp.adapt_budget_factor <= 1, "loop.adapt_budget_factor", lp.adapt_budget_factor, "0 < x <= 1")
    _check(0 < lp.adapt_strength_factor <= 1, "loop.adapt_strength_factor", lp.adapt_strength_factor, "0 < x <= 1")
