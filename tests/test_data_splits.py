"""Split invariants: no overlap, stratification, grouping, determinism, and errors for small classes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vision_si.config import SplitConfig
from vision_si.data import SampleTable, align_splits, make_splits, read_splits_csv, write_splits_csv
from vision_si.errors import DataError


def fake_table(counts, groups=None, metadata=None, source_splits=None) -> SampleTable:
    labels = np.repeat(np.arange(len(counts)), counts)
    n = len(labels)
    return SampleTable(
        ids=[f"s{i:04d}" for i in range(n)], labels=labels, classes=[f"c{k}" for k in range(len(counts))],
        sources=[f"/data/s{i:04d}.png" for i in range(n)], sha256=[f"{i:064x}" for i in range(n)],
        groups=groups if groups is not None else [None] * n,
        metadata=metadata if metadata is not None else [{} for _ in range(n)],
        loader=lambda i: np.zeros((4, 4, 1), np.float32), source_splits=source_splits,
    )


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(3, 60), min_size=2, max_size=5), test_fraction=st.floats(0.1, 0.4),
       val_fraction=st.floats(0.1, 0.4), seed=st.integers(0, 2**31))
def test_ungrouped_splits_are_stratified_within_one_image(counts, test_fraction, val_fraction, seed):
    table = fake_table(counts)
    cfg = SplitConfig(test_fraction=test_fraction, val_fraction=val_fraction)
    splits = make_splits(table, cfg, seed)
    assert set(splits) == {"train", "val", "test"} and len(splits) == len(table)
    for k, n in enumerate(counts):
        mine = splits[table.labels == k]
        n_test, n_val = int((mine == "test").sum()), int((mine == "val").sum())
        assert n_test >= 1 and n_val >= 1 and (mine == "train").sum() >= 1
        if test_fraction * n >= 1 and test_fraction * n <= n - 2:  # not pushed by the one-per-split floor
            assert abs(n_test - test_fraction * n) <= 1
        rest = n - n_test
        if 1 <= val_fraction * rest <= rest - 1:
            assert abs(n_val - val_fraction * rest) <= 1
    assert np.array_equal(splits, make_splits(table, cfg, seed))


def test_splits_follow_the_fractions_on_a_larger_set():
    table = fake_table([400, 100, 40])
    splits = make_splits(table, SplitConfig(test_fraction=0.25, val_fraction=0.2), seed=0)
    assert (splits[table.labels == 0] == "test").sum() == 100
    assert (splits[table.labels == 0] == "val").sum() == 60
    assert (splits[table.labels == 2] == "test").sum() == 10
    assert not np.array_equal(splits, make_splits(table, SplitConfig(), seed=1))


def test_grouped_splits_never_share_a_group():
    rng = np.random.default_rng(0)
    n_groups = 40
    sizes = rng.integers(1, 6, n_groups)
    groups = [f"patient{g}" for g in range(n_groups) for _ in range(sizes[g])]
    labels = np.array([g % 2 for g in range(n_groups) for _ in range(sizes[g])])
    counts = np.bincount(labels)
    order = np.argsort(labels, kind="stable")  # fake_table lays classes out in blocks
    table = fake_table(counts.tolist(), groups=[groups[i] for i in order])
    splits = make_splits(table, SplitConfig(test_fraction=0.25, val_fraction=0.2), seed=5)
    for g in set(table.groups):
        assert len({splits[i] for i in range(len(table)) if table.groups[i] == g}) == 1
    for k in range(2):
        assert {"train", "val", "test"} <= set(splits[table.labels == k])
    share = (splits == "test").mean()
    assert 0.1 < share < 0.4
    assert np.array_equal(splits, make_splits(table, SplitConfig(), seed=5))


def test_group_by_reads_a_metadata_key():
    n = 60
    meta = [{"site": f"site{i % 12}"} for i in range(n)]
    table = fake_table([30, 30], metadata=meta)
    splits = make_splits(table, SplitConfig(group_by="site"), seed=0)
    for site in {m["site"] for m in meta}:
        assert len({splits[i] for i in range(n) if meta[i]["site"] == site}) == 1
    with pytest.raises(DataError, match="group_by: 'scanner'.*metadata keys: \\['site'\\]"):
        make_splits(table, SplitConfig(group_by="scanner"), seed=0)


def test_class_too_small_for_a_split_is_named_with_its_count():
    with pytest.raises(DataError, match=r"class 'c1' has 2 image\(s\)"):
        make_splits(fake_table([10, 2]), SplitConfig(), seed=0)
    # grouped: the only groups of class c1 all land in train
    groups = [f"g{i}" for i in range(20)] + ["big"] * 3
    with pytest.raises(DataError, match=r"class 'c1' has 3 image\(s\) and none of them lands in '\w+' when whole groups"):
        make_splits(fake_table([20, 3], groups=groups), SplitConfig(), seed=0)


def test_source_split_is_honoured_when_asked():
    source = ["train", "train", "val", "val", "test", "test"] * 2
    table = fake_table([6, 6], source_splits=source)
    table.labels = np.array([0, 1] * 6)
    splits = make_splits(table, SplitConfig(use_source_split=True), seed=0)
    assert splits.tolist() == source
    with pytest.raises(DataError, match="ships no split"):
        make_splits(fake_table([6, 6]), SplitConfig(use_source_split=True), seed=0)


def test_splits_csv_is_byte_identical_and_reads_back(tmp_path):
    table = fake_table([24, 18], groups=[f"g{i // 2}" for i in range(42)])
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    write_splits_csv(table, make_splits(table, SplitConfig(), seed=7), a)
    write_splits_csv(table, make_splits(table, SplitConfig(), seed=7), b)
    assert a.read_bytes() == b.read_bytes()
    lines = a.read_text().splitlines()
    assert lines[0] == "id,source,sha256,class,group,split" and len(lines) == 43
    rows = read_splits_csv(a)
    assert rows[0]["id"] == "s0000" and rows[0]["group"] == "g0" and rows[0]["class"] == "c0"
    np.testing.assert_array_equal(read_splits_csv(a, table), make_splits(table, SplitConfig(), seed=7))
    table.sha256[3] = "f" * 64  # the image changed since the split was written
    with pytest.raises(DataError, match="s0003.*sha256"):
        align_splits(table, rows, a)
    (tmp_path / "bad.csv").write_text("id,split\nx,train\n")
    with pytest.raises(DataError, match="bad.csv.*columns"):
        read_splits_csv(tmp_path / "bad.csv")


def test_judge_split_keeps_select_and_judge_apart_per_class():
    from vision_si.data import judge_split

    labels = np.repeat(np.arange(4), [100, 21, 2, 1])
    select, judge = judge_split(labels, 0.5, seed=3)
    assert len(np.intersect1d(select, judge)) == 0 and len(select) + len(judge) == len(labels)
    counts = np.bincount(labels[judge], minlength=4)
    assert counts[0] == 50 and counts[1] in (10, 11) and counts[2] == 1  # a pair splits one and one
    assert np.array_equal(judge_split(labels, 0.5, seed=3)[1], judge)  # deterministic for a seed
    assert not np.array_equal(judge_split(labels, 0.5, seed=4)[1], judge)
    with pytest.raises(ValueError, match="judge_fraction"):
        judge_split(labels, 1.0, seed=0)
