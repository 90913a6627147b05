"""Property-based tests (hypothesis) for the three pieces every run leans on: the config parser, the
splitter and the budget allocator. Settings stay modest so the file runs in seconds."""

from __future__ import annotations

import dataclasses
import math
import typing

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from vision_si.budget import allocate_budget, largest_remainder, water_fill
from vision_si.config import (
    FILTER_NAMES,
    DiagnoseConfig,
    RunConfig,
    SplitConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from vision_si.data.splits import SPLITS, make_splits, read_splits_csv, write_splits_csv
from vision_si.data.table import SampleTable
from vision_si.errors import ConfigError, DataError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --------------------------------------------------------------------------- config parser


def field_paths(cls: type = RunConfig, prefix: str = "") -> dict[str, typing.Any]:
    """Every leaf key of the config as a dotted path → its annotation."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        target = inner[0] if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType) else tp
        if dataclasses.is_dataclass(target):
            out.update(field_paths(target, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


PATHS = field_paths()
SECTIONS = {p.rsplit(".", 1)[0] for p in PATHS if "." in p}

# valid values for a sample of keys (ranges from validate_config), used to build valid configs
VALID = {
    "name": st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True),
    "seed": st.integers(0, 2**31),
    "data.source": st.sampled_from(["elpv", "imagefolder", "csv", "medmnist", "digits"]),
    "data.image_size": st.integers(8, 1024),
    "data.channels": st.sampled_from([None, 1, 3]),
    "data.max_per_class": st.none() | st.integers(3, 10**6),
    "data.resize": st.sampled_from(["resize", "resize_crop"]),
    "data.alpha": st.sampled_from(["drop", "composite_white", "composite_black"]),
    "data.augment": st.sampled_from(["none", "light", "standard", "strong"]),
    "data.split.test_fraction": st.floats(0.01, 0.89),
    "data.split.val_fraction": st.floats(0.01, 0.89),
    "data.split.seed": st.none() | st.integers(0, 10**9),
    "data.split.group_by": st.none() | st.text(min_size=1, max_size=8),
    "classifier.batch_size": st.integers(1, 65536),
    "classifier.lr": st.floats(1e-8, 10),
    "classifier.label_smoothing": st.floats(0, 0.99),
    "classifier.ema": st.booleans(),
    "classifier.ema_decay": st.floats(0.01, 0.999),
    "classifier.model_kwargs": st.dictionaries(st.text(min_size=1, max_size=5), st.integers() | st.text(max_size=5),
                                               max_size=3),
    "diagnose.max_clusters": st.integers(1, 50),
    "diagnose.budget_total": st.integers(0, 1_000_000),
    "diagnose.budget_cap_fraction": st.floats(0.001, 1.0),
    "diagnose.embedding_map": st.sampled_from(["auto", "umap", "pca", "tsne"]),
    "generate.strength": st.floats(0, 1),
    "generate.steps": st.none() | st.integers(1, 5000),
    "generate.mode": st.sampled_from(["exemplar", "class", "guided"]),
    "filter.enabled": st.lists(st.sampled_from(FILTER_NAMES), unique=True),
    "filter.fidelity_percentile": st.none() | st.floats(0, 50),
    "gate.tolerance": st.floats(0, 1),
    "gate.tolerance_min_images": st.integers(0, 1000),
    "threads": st.none() | st.integers(1, 1024),
    "gate.seeds_per_look": st.integers(1, 9),
    "gate.metric": st.sampled_from(["macro_auroc", "log_loss", "macro_f1", "balanced_accuracy"]),
    "gate.admit": st.sampled_from(["superiority", "non_inferiority"]),
    "gate.start": st.sampled_from(["warm", "scratch"]),
    "classifier.sampling": st.sampled_from(["natural", "balanced", "sqrt"]),
    "classifier.epochs": st.none() | st.floats(0.01, 1000),
    "loop.max_rounds": st.integers(0, 100),
    "loop.patience": st.integers(1, 1000),
    "loop.on_reject": st.sampled_from(["adapt", "repeat"]),
}


def nest(pairs: dict[str, typing.Any]) -> dict[str, typing.Any]:
    out: dict[str, typing.Any] = {}
    for path, value in pairs.items():
        *heads, last = path.split(".")
        node = out
        for h in heads:
            node = node.setdefault(h, {})
        node[last] = value
    return out


valid_pairs = st.fixed_dictionaries({}, optional=VALID)


@FAST
@given(pairs=valid_pairs)
def test_valid_configs_round_trip_through_yaml_and_overrides(pairs, tmp_path_factory):
    cfg = config_from_dict(nest(pairs))
    for path, value in pairs.items():  # every given value is what the object holds
        obj = cfg
        for part in path.split("."):
            obj = getattr(obj, part)
        assert obj == value
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    # the same values given as --set overrides build the same object
    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for k, v in pairs.items() if not isinstance(v, dict)]
    dict_pairs = {k: v for k, v in pairs.items() if isinstance(v, dict)}
    assume(all("\n" not in o for o in overrides))
    assert config_from_dict(apply_overrides(nest(dict_pairs), overrides)) == cfg


garbage = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
any_path = st.sampled_from(sorted(PATHS)) | st.sampled_from(sorted(SECTIONS)) | st.builds(
    lambda sec, key: f"{sec}.{key}" if sec else key,
    st.sampled_from(["", *sorted(SECTIONS)]), st.from_regex(r"[a-z_]{1,10}", fullmatch=True))


@settings(max_examples=100, deadline=None)
@given(pairs=st.dictionaries(any_path, garbage, min_size=1, max_size=4), base=valid_pairs)
def test_any_config_mapping_builds_or_raises_config_error_naming_a_key(pairs, base):
    """Random nested mappings of known and unknown keys with values of any type: the parser either
    builds a config or raises ConfigError naming a key; no other exception ever escapes."""
    data = nest(base)
    for path, value in pairs.items():  # a path may replace a whole section, or go under a scalar
        *heads, last = path.split(".")
        node = data
        for h in heads:
            if not isinstance(node.get(h), dict):
                node[h] = {}
            node = node[h]
        node[last] = value
    try:
        cfg = config_from_dict(data)
    except ConfigError as exc:
        msg = str(exc)
        named = set(PATHS) | SECTIONS | set(pairs)
        assert any(p in msg for p in named), msg
        return
    assert isinstance(cfg, RunConfig)


@FAST
@given(path=st.sampled_from(sorted(p for p, tp in PATHS.items() if tp in (int, float, bool, "int", "float"))),
       value=st.text(min_size=1, max_size=5) | st.lists(st.integers(), max_size=2))
def test_a_wrong_type_names_its_dotted_key(path, value):
    with pytest.raises(ConfigError) as info:
        config_from_dict(nest({path: value}))
    assert path in str(info.value)


@FAST
@given(section=st.sampled_from(sorted(SECTIONS)), key=st.from_regex(r"[a-z]{1,12}", fullmatch=True))
def test_an_unknown_key_is_named_with_its_section(section, key):
    known = {p.rsplit(".", 1)[1] for p in PATHS if p.rsplit(".", 1)[0] == section} | {
        s.rsplit(".", 1)[1] for s in SECTIONS if s.startswith(section + ".")}
    assume(key not in known)
    with pytest.raises(ConfigError, match=f"unknown key '{section}.{key}'"):
        config_from_dict(nest({f"{section}.{key}": 1}))


# --------------------------------------------------------------------------- splitter


def table(counts: list[int], groups: list[str | None] | None = None) -> SampleTable:
    labels = np.repeat(np.arange(len(counts)), counts)
    n = len(labels)
    return SampleTable(ids=[f"img{i:05d}" for i in range(n)], labels=labels,
                       classes=[f"class{k}" for k in range(len(counts))], sources=[f"s{i}" for i in range(n)],
                       sha256=[f"{i:064x}" for i in range(n)], groups=groups or [None] * n,
                       metadata=[{} for _ in range(n)], loader=lambda i: np.zeros((2, 2, 1), np.float32))


@st.composite
def split_inputs(draw):
    counts = draw(st.lists(st.integers(3, 40), min_size=2, max_size=5))
    n = sum(counts)
    grouped = draw(st.booleans())
    groups = None
    if grouped:  # group sizes 1..4, some rows ungrouped
        n_groups = draw(st.integers(1, max(1, n // 2)))
        codes = draw(st.lists(st.integers(0, n_groups - 1) | st.none(), min_size=n, max_size=n))
        groups = [None if c is None else f"g{c}" for c in codes]
    cfg = SplitConfig(test_fraction=draw(st.floats(0.1, 0.4)), val_fraction=draw(st.floats(0.1, 0.4)))
    return counts, groups, cfg, draw(st.integers(0, 10**6))


@FAST
@given(args=split_inputs())
def test_splits_assign_every_row_once_keep_groups_whole_and_are_deterministic(args, tmp_path_factory):
    counts, groups, cfg, seed = args
    t = table(counts, groups)
    try:
        splits = make_splits(t, cfg, seed)
    except DataError as exc:
        # only allowed when some class cannot reach every split, or too few groups: named in the message
        msg = str(exc)
        assert any(f"class '{c}'" in msg for c in t.classes) or "groups remain" in msg or "folds" in msg, msg
        return
    assert splits.shape == (len(t),) and set(splits) <= set(SPLITS)  # every row, exactly one split
    assert np.array_equal(splits, make_splits(t, cfg, seed))  # deterministic
    for k in range(len(counts)):  # every class present in every split
        assert {str(s) for s in splits[t.labels == k]} == set(SPLITS)
    if groups is not None:  # no group in two splits
        by_group: dict[str, set] = {}
        for g, s in zip(groups, splits, strict=True):
            if g is not None:
                by_group.setdefault(g, set()).add(str(s))
        assert all(len(v) == 1 for v in by_group.values())
    # splits.csv reads back to the same assignment
    path = tmp_path_factory.mktemp("splits") / "splits.csv"
    write_splits_csv(t, splits, path)
    assert np.array_equal(read_splits_csv(path, t), splits)


@FAST
@given(counts=st.lists(st.integers(0, 2), min_size=1, max_size=3), big=st.integers(3, 20))
def test_a_class_too_small_to_split_is_named(counts, big):
    t = table([big, *counts])
    small = next(k + 1 for k, c in enumerate(counts) if c < 3)
    with pytest.raises(DataError, match=f"class 'class{small}' has {counts[small - 1]} image"):
        make_splits(t, SplitConfig(), 0)


# --------------------------------------------------------------------------- budget allocator


@FAST
@given(weights=st.lists(st.floats(0, 100), min_size=1, max_size=12), total=st.integers(0, 10_000),
       floor_frac=st.floats(0, 1), cap_frac=st.floats(0, 1))
def test_water_fill_sums_to_the_total_within_floor_and_cap(weights, total, floor_frac, cap_frac):
    n = len(weights)
    lo_cap = math.ceil(total / n)  # water_fill needs n·floor ≤ total ≤ n·cap
    cap = lo_cap + cap_frac * (total - lo_cap) if total else 0.0
    floor = floor_frac * min(total / n, cap)
    shares = water_fill(np.array(weights), total, floor, cap)
    assert shares.sum() == pytest.approx(total, abs=1e-6 * max(1, total))
    assert np.all(shares >= floor - 1e-9) and np.all(shares <= cap + 1e-9)
    # more weight never gets fewer images
    order = np.argsort(np.array(weights), kind="stable")
    assert np.all(np.diff(shares[order]) >= -1e-6 * max(1, total))


@FAST
@given(weights=st.lists(st.floats(0, 100), min_size=1, max_size=12), total=st.integers(0, 10_000),
       cap_frac=st.floats(0, 1))
def test_largest_remainder_gives_non_negative_integers_summing_exactly(weights, total, cap_frac):
    n = len(weights)
    cap = math.ceil(total / n) + math.floor(cap_frac * total)
    shares = water_fill(np.array(weights), total, 0.0, float(cap))
    order = np.argsort(np.argsort(-np.array(weights), kind="stable"), kind="stable")
    counts = largest_remainder(shares, total, cap, order)
    assert counts.dtype.kind == "i" and np.all(counts >= 0)
    assert int(counts.sum()) == total
    assert np.all(counts <= cap)
    assert np.all(np.abs(counts - shares) < 1 + 1e-6)  # each count is its share rounded up or down


@FAST
@given(data=st.data())
def test_allocate_budget_places_exactly_the_total_within_caps_and_floors(data):
    k = data.draw(st.integers(1, 8), label="classes")
    val = data.draw(st.lists(st.integers(0, 60), min_size=k, max_size=k), label="val")
    errors = [data.draw(st.integers(0, v)) for v in val]
    train = data.draw(st.lists(st.integers(0, 500), min_size=k, max_size=k), label="train")
    total, floor = data.draw(st.integers(0, 2000), label="total"), data.draw(st.integers(0, 50), label="floor")
    cap = data.draw(st.floats(0.01, 1.0), label="cap")
    cfg = DiagnoseConfig(budget_total=total, budget_floor=floor, budget_cap_fraction=cap)
    kwargs = dict(classes=[f"c{i}" for i in range(k)], class_errors=np.array(errors), class_val=np.array(val),
                  class_train=np.array(train), slices=[], class_exemplars={i: [f"t{i}"] for i in range(k)},
                  mode="exemplar", strength=0.5)
    cap_n = max(1, math.floor(cap * total))
    if total and floor > cap_n:
        with pytest.raises(ConfigError, match="budget_floor"):
            allocate_budget(cfg, **kwargs)
        return
    budget, notes = allocate_budget(cfg, **kwargs)
    counts = [a.count for a in budget]
    assert sum(counts) == total
    assert all(isinstance(c, int) and c > 0 for c in counts)
    assert len({(a.class_index, a.slice_id) for a in budget}) == len(budget)
    limit = math.ceil(total / k) if any("cap raised" in n for n in notes) else cap_n
    assert max(counts, default=0) <= limit
    if not any("lowered" in n or "dropped" in n for n in notes):
        assert min(counts, default=floor) >= floor
    assert allocate_budget(cfg, **kwargs) == (budget, notes)  # deterministic
