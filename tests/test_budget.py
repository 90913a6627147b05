"""Budget allocation: exact totals, caps, floors, and what happens when they cannot all hold."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vision_si.budget import CLASS_SLICE, allocate_budget
from vision_si.config import DiagnoseConfig
from vision_si.errors import ConfigError
from vision_si.slices import SliceReport

CLASSES = ["a", "b", "c", "d", "e"]


def slice_report(k: int, j: int, errors: int, n_val: int, weak: bool = True) -> SliceReport:
    return SliceReport(slice_id=f"c{k}-s{j}", class_index=k, class_name=CLASSES[k], cluster=j, n_train=10,
                       n_val=n_val, n_val_errors=errors, error_rate=errors / n_val, error_ci=[0.0, 1.0],
                       decision_lower=0.5, p_value=0.0, class_error_rate=0.1, mean_margin=0.0, dominant_wrong_class="b",
                       dominant_wrong_count=errors, weak=weak, exemplar_ids=[f"t{k}-{j}-{i}" for i in range(3)])


def allocate(cfg, errors, val, train, slices=(), mode="exemplar"):
    exemplars = {k: [f"t{k}"] for k in range(len(CLASSES))}
    return allocate_budget(cfg, classes=CLASSES, class_errors=np.array(errors), class_val=np.array(val),
                           class_train=np.array(train), slices=list(slices), class_exemplars=exemplars,
                           mode=mode, strength=0.4)


@settings(max_examples=150, deadline=None)
@given(total=st.integers(1, 500), floor=st.integers(0, 20), cap=st.floats(0.05, 1.0),
       errors=st.lists(st.integers(0, 30), min_size=5, max_size=5),
       train=st.lists(st.integers(1, 500), min_size=5, max_size=5))
def test_counts_sum_to_total_within_floor_and_cap(total, floor, cap, errors, train):
    cfg = DiagnoseConfig(budget_total=total, budget_floor=floor, budget_cap_fraction=cap)
    cap_n = max(1, math.floor(cap * total))
    if floor > cap_n:
        with pytest.raises(ConfigError, match="budget_floor"):
            allocate(cfg, errors, [40] * 5, train)
        return
    budget, notes = allocate(cfg, errors, [40] * 5, train)
    counts = [a.count for a in budget]
    assert sum(counts) == total
    raised = [n for n in notes if "cap raised" in n]
    lowered = [n for n in notes if "lowered" in n]
    limit = cap_n if not raised else math.ceil(total / len(CLASSES))
    assert max(counts) <= limit
    if not lowered:
        assert min(counts) >= floor
    if raised:  # only when five classes at the cap cannot hold the total
        assert cap_n * len(CLASSES) < total


def test_allocation_follows_the_deficit_score():
    cfg = DiagnoseConfig(budget_total=100, budget_cap_fraction=1.0)
    # same error rate; class 1 has far less training data, so it gets more
    budget, _ = allocate(cfg, [10, 10, 0, 0, 0], [50, 50, 50, 50, 50], [400, 100, 300, 300, 300])
    by_class = {a.class_name: a.count for a in budget}
    assert set(by_class) == {"a", "b"}
    share_a, share_b = 400 / 1400, 100 / 1400
    assert by_class["b"] / by_class["a"] == pytest.approx((1 - share_b) / (1 - share_a), rel=0.05)


def test_weak_slices_and_the_rest_of_their_class_split_its_errors():
    cfg = DiagnoseConfig(budget_total=60, budget_cap_fraction=1.0)
    slices = [slice_report(0, 1, errors=8, n_val=10)]
    budget, _ = allocate(cfg, [12, 0, 0, 0, 0], [50] * 5, [100] * 5, slices)
    units = {a.slice_id: a for a in budget}
    assert set(units) == {"c0-s1", CLASS_SLICE}
    assert units["c0-s1"].count == 40 and units[CLASS_SLICE].count == 20  # 8 vs 4 errors
    assert units["c0-s1"].exemplar_ids == slices[0].exemplar_ids
    assert all(a.mode == "exemplar" and a.strength == 0.4 for a in budget)


def test_cap_spills_over_to_other_classes():
    cfg = DiagnoseConfig(budget_total=100, budget_cap_fraction=0.3)
    budget, notes = allocate(cfg, [20, 1, 0, 0, 0], [50] * 5, [100] * 5)
    counts = {a.class_name: a.count for a in budget}
    assert sum(counts.values()) == 100 and max(counts.values()) <= 30
    assert counts["a"] == 30
    assert any("joined the budget only because the cap" in n for n in notes)


def test_floor_drops_the_smallest_units_when_it_cannot_hold_for_all():
    cfg = DiagnoseConfig(budget_total=20, budget_floor=10, budget_cap_fraction=1.0)
    budget, notes = allocate(cfg, [10, 8, 6, 0, 0], [50] * 5, [100] * 5)
    assert [a.class_name for a in budget] == ["a", "b"] and [a.count for a in budget] == [10, 10]
    assert any("dropped" in n for n in notes)


def test_missing_exemplars_fall_back_to_class_mode_and_zero_total_is_empty():
    cfg = DiagnoseConfig(budget_total=10, budget_cap_fraction=1.0)
    budget, notes = allocate_budget(cfg, classes=CLASSES, class_errors=np.array([5, 0, 0, 0, 0]),
                                    class_val=np.array([50] * 5), class_train=np.array([0, 9, 9, 9, 9]),
                                    slices=[], class_exemplars={}, mode="exemplar", strength=0.5)
    assert budget[0].mode == "class"
    from vision_si.config import LoopConfig
    from vision_si.stages import generation_requests

    assert generation_requests(budget, LoopConfig(), rejected=0)[0].mode == "class"  # the allocation's own mode
    assert any("class-conditional" in n for n in notes)
    assert allocate(DiagnoseConfig(budget_total=0), [5, 0, 0, 0, 0], [50] * 5, [9] * 5) == ([], [])


def test_a_slices_weight_is_multiplied_by_its_stability():
    from dataclasses import replace

    cfg = DiagnoseConfig(budget_total=120, budget_cap_fraction=1.0)
    steady, shaky = slice_report(0, 0, 10, 20), slice_report(0, 1, 10, 20)
    base = {a.slice_id: a.count for a in allocate(cfg, [20, 0, 0, 0, 0], [40] * 5, [100] * 5, [steady, shaky])[0]}
    assert base["c0-s0"] == base["c0-s1"]  # equal errors, no stability measured: equal shares
    budget, _ = allocate(cfg, [20, 0, 0, 0, 0], [40] * 5, [100] * 5,
                         [replace(steady, stability=1.0), replace(shaky, stability=0.25)])
    got = {a.slice_id: a.count for a in budget}
    assert got["c0-s0"] == pytest.approx(4 * got["c0-s1"], abs=1)


def test_a_slice_judged_out_of_fold_is_scored_by_its_judged_errors():
    from dataclasses import replace

    cfg = DiagnoseConfig(budget_total=100, budget_cap_fraction=1.0)
    # one val error but 30 of the class's 200 judged images wrong (val + out-of-fold train)
    s = replace(slice_report(0, 0, 1, 5), n_judged=40, n_judged_errors=30, class_n_judged=200)
    budget, _ = allocate(cfg, [2, 0, 0, 0, 0], [40] * 5, [100] * 5, [s])
    units = {a.slice_id: a.deficit for a in budget}
    assert units["c0-s0"] == pytest.approx(30 / 200 * (1 - 100 / 500))
