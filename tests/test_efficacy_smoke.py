"""Smoke test of the efficacy benchmark's machinery: digits at 16 px, arms A and B, one seed, a few steps."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "efficacy.py"


@pytest.fixture(scope="module")
def efficacy():
    spec = importlib.util.spec_from_file_location("efficacy_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PROFILE = {
    "name": "smoke",
    "seeds": [0],
    "arms": ["A", "B"],
    "n_bootstrap": 100,
    "run": {
        "name": "smoke",
        "data": {"source": "digits", "image_size": 16, "augment": "strong", "split": {"seed": 0}},
        "classifier": {"arch": "test_resnet", "steps": 4, "batch_size": 16, "warmup_steps": 1, "eval_every": 4,
                       "device": "cpu"},
    },
}


def test_two_arms_one_seed_writes_schema_and_paired_differences(efficacy, tmp_path):
    res = efficacy.run_benchmark(PROFILE, work=tmp_path / "work", out_stem=tmp_path / "out", echo=lambda m: None)
    saved = json.loads((tmp_path / "out.json").read_text())
    assert (tmp_path / "out.md").read_text().startswith("# Efficacy")
    for key in ("profile", "protocol", "classes", "scarcest_class", "test", "val", "runs", "predictions", "evidence"):
        assert key in saved
    classes = saved["classes"]
    assert set(saved["test"]) == {"A", "B"}
    pooled = saved["test"]["A"]["pooled"]
    assert {"macro_f1", "balanced_accuracy", "accuracy"} | {f"recall/{c}" for c in classes} == set(pooled)
    for v in pooled.values():
        assert v["ci"][0] <= v["value"] <= v["ci"][1]
    # A differs from B (no balanced sampling, standard augmentation), and its difference is paired against B
    assert "vs_B" not in saved["test"]["B"]
    d = saved["test"]["A"]["vs_B"]
    assert d["seeds"] == [0] and set(d["per_seed"]) == {"0"}
    y = np.asarray(saved["test_labels"])
    pa, pb = (np.asarray(saved["predictions"][a]["0"]["test"]) for a in ("A", "B"))
    assert len(pa) == len(y) == res["n_test"]
    expected = (pa == y).mean() - (pb == y).mean()
    assert d["pooled"]["accuracy"]["delta"] == pytest.approx(expected)
    assert d["pooled"]["accuracy"]["ci"][0] <= d["pooled"]["accuracy"]["delta"] <= d["pooled"]["accuracy"]["ci"][1]


def test_rerun_resumes_from_the_work_folder(efficacy, tmp_path):
    efficacy.run_benchmark(PROFILE, arms=["B"], work=tmp_path / "w", out_stem=tmp_path / "o", echo=lambda m: None)
    first = json.loads((tmp_path / "w" / "seed-0" / "B" / "result.json").read_text())
    logged: list[str] = []
    efficacy.run_benchmark(PROFILE, arms=["B"], work=tmp_path / "w", out_stem=tmp_path / "o", echo=logged.append)
    assert not any("start" in m for m in logged)  # nothing retrained
    assert json.loads((tmp_path / "w" / "seed-0" / "B" / "result.json").read_text()) == first


def test_unknown_arm_and_deitsch_loop_arm_are_refused(efficacy, tmp_path):
    from vision_si.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown arm 'Z'"):
        efficacy.run_benchmark(PROFILE, arms=["Z"], work=tmp_path, out_stem=tmp_path / "o")
    with pytest.raises(ConfigError, match="deitsch"):
        efficacy.run_benchmark(PROFILE, arms=["E"], protocol="deitsch", work=tmp_path, out_stem=tmp_path / "o")
