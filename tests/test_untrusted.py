"""Untrusted files and the evaluation invariants, on a real (tiny) run directory.

- A malicious pickle (its `__reduce__` creates a marker file) planted where a checkpoint, a resume
  state, a cached generator or pretrained weights should be is refused without being executed.
- No module of `vision_si` can unpickle: an AST scan for pickle/dill/joblib loads, `torch.load`
  without `weights_only=True`, `np.load(allow_pickle=True)`, `yaml.load` without a safe loader,
  `trust_remote_code=True`, `eval`/`exec`.
- Synthetic images never reach `val`/`test`: a `splits.csv` forged with its digest re-recorded (a
  synthetic id, or a synthetic PNG's sha256) stops `vsi resume` with exit code 3 (an edit without the
  digest is refused before that: tests/test_tampering.py); a near-copy of a val image in the
  synthetic pool stops the run; `test` is evaluated once, after every decision.
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_helpers import vsi
from tiny_run import copy_run, forge_splits, make_run, tiny_config

from vision_si.errors import EvaluationInvariantError

PACKAGE = Path(__file__).resolve().parents[1] / "vision_si"


class Payload:
    """Unpickling this calls `open(marker, "w")`: the marker's existence proves the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("untrusted"), name="untrusted")
    assert (run / "summary.json").is_file()
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return copy_run(finished_run, tmp_path)


def manifest_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "round-01/generate/manifest.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- malicious pickles


def test_pickle_in_place_of_the_checkpoint_weights_is_refused_unexecuted(run_copy, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    folder = run_copy / "round-00/train/seed-0"
    evil = pickle.dumps(Payload(marker))
    (folder / "model.safetensors").write_bytes(evil)
    # make model.json vouch for the planted bytes, so the refusal comes from the format, not the sha256
    import hashlib

    meta = json.loads((folder / "model.json").read_text())
    meta["weights_sha256"] = hashlib.sha256(evil).hexdigest()
    (folder / "model.json").write_text(json.dumps(meta))
    code, err = vsi(capsys, "resume", run_copy, "--quiet")
    assert code == 2 and "seed-0/model.safetensors" in err and "not a safetensors file" in err, err
    assert not marker.exists()
    pickle.loads(evil)  # the payload is live: loading it does create the marker
    assert marker.exists()


def test_torch_pickle_next_to_a_missing_checkpoint_is_never_loaded(run_copy, tmp_path, capsys):
    from vision_si.classifier import load_classifier
    from vision_si.errors import DataError

    marker = tmp_path / "PWNED"
    folder = run_copy / "round-00/train/seed-0"
    (folder / "model.safetensors").unlink()
    torch.save({"state_dict": Payload(marker)}, folder / "model.pt")
    code, err = vsi(capsys, "resume", run_copy, "--quiet")
    assert code == 2 and "model.safetensors" in err, err
    with pytest.raises(DataError, match="pickled torch files are never loaded"):
        load_classifier(folder / "model.pt")
    assert not marker.exists()


def test_pickled_resume_state_is_ignored_and_training_starts_afresh(tmp_path):
    from vision_si.classifier import train_classifier
    from vision_si.config import ClassifierConfig

    marker = tmp_path / "PWNED"
    out = tmp_path / "clf"
    out.mkdir()
    (out / "resume.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    rng = np.random.default_rng(0)
    x, y = rng.random((12, 1, 16, 16), dtype=np.float32), np.arange(12) % 3
    cfg = ClassifierConfig(arch="resnet10t", steps=2, batch_size=4, warmup_steps=1, eval_every=2)
    with pytest.warns(UserWarning, match="unreadable resume state"):
        clf = train_classifier(cfg, x, y, classes=["a", "b", "c"], seed=0, out_dir=out, progress=False,
                               checkpoint_every=1)
    assert clf.meta["classes"] == ["a", "b", "c"] and not marker.exists()


def test_pickle_as_pretrained_weights_is_refused_unexecuted(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    weights = tmp_path / "weights.pt"
    torch.save({"conv1.weight": Payload(marker)}, weights)
    cfg = tiny_config(tmp_path, name="untrusted", classifier={"pretrained": str(weights)})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code, err = vsi(capsys, "train", tmp_path / "cfg.yaml", "--quiet")
    assert code == 2 and "classifier.pretrained" in err and "weights.pt" in err, err
    assert not marker.exists()
    assert not any((tmp_path / "runs").iterdir())  # the new run stopped at set-up and left nothing


def test_pickle_in_the_generator_cache_is_refused_unexecuted(run_copy, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    cfg = yaml.safe_load((run_copy / "config.yaml").read_text())
    cache = tmp_path / "gen-cache"
    shutil.copytree(cfg["generate"]["cache_dir"], cache)  # a private copy: the shared cache stays clean
    cfg["generate"]["cache_dir"] = str(cache)
    (run_copy / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    for stage in ("round-01", "final"):
        shutil.rmtree(run_copy / stage)
    (run_copy / "summary.json").unlink()
    (unet,) = cache.glob("*/pipeline/unet")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_in.weight": Payload(marker)}, unet / "diffusion_pytorch_model.bin")
    code, err = vsi(capsys, "generate", run_copy, "--quiet")
    assert code == 2 and "cannot load the cached generator" in err, err
    assert not marker.exists()


# --------------------------------------------------------------------------- nothing can unpickle


UNSAFE_LOADS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"), ("dill", "loads"),
                ("joblib", "load"), ("cloudpickle", "load"), ("cloudpickle", "loads"), ("pd", "read_pickle"),
                ("pandas", "read_pickle"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("marshal", "loads")}


def _dotted(node: ast.AST) -> tuple[str, ...]:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "<expr>")  # `f().eval` is not the builtin
    return tuple(reversed(parts))


def unsafe_calls(source: str, filename: str) -> list[str]:
    """Every call in `source` that could execute untrusted content, as 'file:line: reason'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        where = f"{filename}:{node.lineno}"
        tail = name[-2:] if len(name) >= 2 else name
        if tail in UNSAFE_LOADS:
            found.append(f"{where}: {'.'.join(name)}")
        if name[-2:] == ("torch", "load") and "safetensors" not in name:  # safetensors.torch.load parses no pickle
            ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if not ok:
                found.append(f"{where}: torch.load without weights_only=True")
        pickled = isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is True
        if name[-2:] in (("np", "load"), ("numpy", "load")) and pickled:
            found.append(f"{where}: np.load(allow_pickle=True)")
        if name[-2:] == ("yaml", "load"):
            loader = kw.get("Loader", node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader)[-1:] not in (("SafeLoader",), ("CSafeLoader",)):
                found.append(f"{where}: yaml.load without SafeLoader")
        if isinstance(kw.get("trust_remote_code"), ast.Constant) and kw["trust_remote_code"].value is not False:
            found.append(f"{where}: trust_remote_code={kw['trust_remote_code'].value!r}")
        if "trust_remote_code" in kw and not isinstance(kw["trust_remote_code"], ast.Constant):
            found.append(f"{where}: trust_remote_code set from a variable")
        if name in (("eval",), ("exec",)):
            found.append(f"{where}: {name[0]}()")
    return found


def test_the_scanner_catches_each_unsafe_pattern():
    bad = """
import pickle, torch, yaml, numpy as np
pickle.load(f); pickle.loads(b)
torch.load(p); torch.load(p, weights_only=False)
np.load(p, allow_pickle=True)
yaml.load(t); yaml.load(t, Loader=yaml.Loader); yaml.unsafe_load(t)
Auto.from_pretrained(m, trust_remote_code=True); Auto.from_pretrained(m, trust_remote_code=flag)
eval("1")
"""
    assert len(unsafe_calls(bad, "bad.py")) == 11
    good = """
torch.load(p, weights_only=True); np.load(p, allow_pickle=False); yaml.safe_load(t)
yaml.load(t, Loader=yaml.SafeLoader); Auto.from_pretrained(m, trust_remote_code=False); model.eval()
"""
    assert unsafe_calls(good, "good.py") == []


def test_no_module_can_unpickle_or_run_remote_code():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = [hit for f in files for hit in unsafe_calls(f.read_text(encoding="utf-8"), str(f.relative_to(PACKAGE)))]
    assert found == []


# --------------------------------------------------------------------------- evaluation invariants


def test_synthetic_id_added_to_splits_as_val_stops_resume(run_copy, capsys):
    row = manifest_rows(run_copy)[0]
    text = (run_copy / "splits.csv").read_text()
    forge_splits(run_copy, text + f"{row['id']},generated,{row['sha256']},{row['class_name']},,val\n")
    code, err = vsi(capsys, "resume", run_copy, "--quiet")
    assert code == 3, err
    assert err.startswith("stopped: ") and "splits.csv" in err and row["id"] in err and "split val" in err
    assert len(err.strip().splitlines()) == 1


def test_synthetic_sha256_copied_into_a_test_row_stops_resume(run_copy, capsys):
    row = manifest_rows(run_copy)[1]
    path = run_copy / "splits.csv"
    lines = path.read_text().splitlines()
    k = next(i for i, line in enumerate(lines) if line.endswith(",test"))
    fields = lines[k].split(",")
    fields[2] = row["sha256"]  # the real id stays, its recorded content is now the synthetic PNG
    lines[k] = ",".join(fields)
    forge_splits(run_copy, "\n".join(lines) + "\n")
    code, err = vsi(capsys, "resume", run_copy, "--quiet")
    assert code == 3 and fields[0] in err and "synthetic" in err, err


def test_near_copy_of_a_val_image_in_the_pool_stops_the_run(run_copy):
    from vision_si.config import load_config
    from vision_si.loop import Loop

    st = Loop(load_config(run_copy / "config.yaml"), run_copy, progress=False, echo=lambda _m: None).prepare()
    val = st.data.pixels("val")
    rng = np.random.default_rng(0)
    near = np.clip(val[3:4] + rng.normal(0, 0.01, val[3:4].shape), 0, 1).astype(np.float32)
    unrelated = rng.random((2, *val.shape[1:]), dtype=np.float32)
    st.guard.no_near_copies(unrelated, ["syn-x-0", "syn-x-1"], [0.95, 0.95])  # nothing like val/test: passes
    with pytest.raises(EvaluationInvariantError, match=f"syn-x-2.*{st.data.ids('val')[3]}"):
        st.guard.no_near_copies(np.concatenate([unrelated, near]), ["syn-x-0", "syn-x-1", "syn-x-2"],
                                [0.95, 0.95, 0.95])
    events = [json.loads(line) for line in (run_copy / "events.jsonl").read_text().splitlines()]
    assert events[-1] == {**events[-1], "event": "test_pixels_read", "purpose": "invariant check"}


def test_test_split_is_read_once_and_only_after_every_decision(finished_run):
    events = [json.loads(line) for line in (finished_run / "events.jsonl").read_text().splitlines()]
    evaluated = [i for i, e in enumerate(events) if e["event"] == "test_evaluated"]
    assert len(evaluated) == 1
    decisions = [i for i, e in enumerate(events) if e["event"] == "stage_done" and e["stage"] != "final"]
    assert evaluated[0] > max(decisions)
    # test pixels are read before that only for the leakage comparisons, each one recorded
    reads = [e for e in events[: evaluated[0]] if e["event"] == "test_pixels_read"]
    assert reads and {e["purpose"] for e in reads} <= {"leakage check", "invariant check"}
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["synthetic_in_eval_splits"] == 0


def test_redoing_the_final_evaluation_is_allowed_only_for_the_same_models(run_copy, capsys):
    before = json.loads((run_copy / "summary.json").read_text())["test"]
    shutil.rmtree(run_copy / "final")  # as if killed during the final evaluation
    (run_copy / "summary.json").unlink()
    code, err = vsi(capsys, "resume", run_copy, "--quiet")
    assert code == 0, err
    assert json.loads((run_copy / "summary.json").read_text())["test"] == before
    events = (run_copy / "events.jsonl").read_text().splitlines()
    assert sum(json.loads(e)["event"] == "test_evaluated" for e in events) == 1
    # the record says other models were evaluated on test: evaluating again is refused
    shutil.rmtree(run_copy / "final")
    (run_copy / "events.jsonl").write_text("\n".join(
        e.replace('"checkpoints": ["', '"checkpoints": ["0000') for e in events) + "\n")
    code, err = vsi(capsys, "resume", run_copy, "--quiet")
    assert code == 3 and "already evaluated once" in err, err
