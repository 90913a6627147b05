"""A run directory that defends its invariants against tampering, path escapes, YAML bombs and corrupt
partial files (issue 18), each case through the real `vsi` entry point.

1. `splits.csv` edited after the run made it: exit 3 naming the file, in `vsi resume`, every stage
   command and `vsi report`, before anything is written (its digest is `splits.sha256`).
2. A manifest row whose path leaves the generate folder (`..`, an absolute path, a symlink out):
   exit 2 naming the manifest line, and the outside file is never opened.
3. A generated PNG replaced on disk: exit 2 naming the file wherever generated images are read back
   (filter, gate, the pool rebuilt on resume).
4. A YAML alias bomb (config, `--set`, plan): exit 2 in well under a second, memory bounded.
5. Deeply nested YAML, `--set` or JSON: exit 2 with one line, not a RecursionError.
6. A corrupt partial generator checkpoint: named in one warning, discarded, and the generator retrained
   to the same weights (and images) as an uninterrupted run.
7. `skipped_images.csv` lists every file left out (both files of a pair with the same bytes in two
   classes, a repeat within a class, a broken file) with its reason; summary.json and the report count them.

Plus the smaller things of the issue: the removed run directory is said to be removed, skip warnings get
lines of their own, a bad `classifier.pretrained` is named before the data loads, a config path that
is a folder is called a folder, the decompression-bomb message quotes the documented limit.

"Nothing went on" is checked as a byte-for-byte snapshot of the run directory before and after.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml
from cli_helpers import run_vsi
from test_bad_input import assert_refused, folder_case, image_folder, png_bytes, vsi, write, write_config
from tiny_run import copy_run, make_run, tiny_config


def snapshot(run: Path) -> dict[str, str]:
    """sha256 of every file under `run` by relative path: equal before and after means nothing was written."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def assert_stopped(res, *needles: str) -> str:
    """Exit 3, one stderr line starting `stopped:` holding every needle."""
    assert res.code == 3, f"exit {res.code}: {res.err}"
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stopped: "), res.err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("tamper"), name="tamper")
    assert (run / "summary.json").is_file() and (run / "splits.sha256").is_file()
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return copy_run(finished_run, tmp_path)


def back_to(run: Path, stage: str) -> Path:
    """Cut a finished run back to just before round 1's `stage` (generate, filter or gate)."""
    order = ["generate", "filter", "gate"]
    for later in order[order.index(stage):]:
        shutil.rmtree(run / "round-01" / later, ignore_errors=True)
    shutil.rmtree(run / "final")
    for name in ("summary.json", "report.html"):
        (run / name).unlink()
    return run


def move_test_rows_to_train(run: Path, n: int) -> list[str]:
    path = run / "splits.csv"
    lines = path.read_text().splitlines()
    moved = []
    for k, line in enumerate(lines):
        if line.endswith(",test") and len(moved) < n:
            lines[k] = line[: -len("test")] + "train"
            moved.append(line.split(",")[0])
    path.write_text("\n".join(lines) + "\n")
    return moved


def manifest(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "round-01/generate/manifest.jsonl").read_text().splitlines()]


def write_manifest(run: Path, rows: list[dict]) -> None:
    (run / "round-01/generate/manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# --------------------------------------------------------------------------- 1. the split's digest


def test_a_test_row_moved_to_train_in_a_finished_run_stops_resume(run_copy, capsys):
    move_test_rows_to_train(run_copy, 1)
    before = snapshot(run_copy)
    assert_stopped(vsi(capsys, "resume", run_copy, "--quiet"), str(run_copy / "splits.csv"), "changed since the run made it")
    assert snapshot(run_copy) == before  # summary.json still says 100 test images, as final/test.json does


@pytest.mark.parametrize("command", ["resume", "train", "diagnose", "generate", "filter", "gate", "report"])
def test_test_rows_moved_to_train_after_generate_stop_every_command(command, run_copy, capsys):
    back_to(run_copy, "filter")
    move_test_rows_to_train(run_copy, 5)
    before = snapshot(run_copy)
    quiet = [] if command == "report" else ["--quiet"]
    assert_stopped(vsi(capsys, command, run_copy, *quiet), "splits.csv", "splits.sha256")
    assert snapshot(run_copy) == before  # no stage ran: no gate trained on test images, no report written


def test_a_missing_digest_stops_the_run(run_copy, capsys):
    (run_copy / "splits.sha256").unlink()
    before = snapshot(run_copy)
    assert_stopped(vsi(capsys, "resume", run_copy, "--quiet"), "splits.csv", "splits.sha256", "is missing")
    assert snapshot(run_copy) == before


def test_a_split_remade_identically_matches_its_recorded_digest(run_copy, capsys):
    """A kill between writing the digest and splits.csv leaves the digest alone: the split is made again
    from the same data and seed, must match it, and the run goes on."""
    text = (run_copy / "splits.csv").read_text()
    (run_copy / "splits.csv").unlink()
    code, err, _ = run_vsi(capsys, "resume", run_copy, "--quiet")
    assert code == 0, err
    assert (run_copy / "splits.csv").read_text() == text
    # the same kill with other split settings: the remade split differs from the record
    (run_copy / "splits.csv").unlink()
    cfg = yaml.safe_load((run_copy / "config.yaml").read_text())
    cfg["data"]["split"]["seed"] = 99
    (run_copy / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert_stopped(vsi(capsys, "resume", run_copy, "--quiet"), "splits.csv", "differs from the one this run recorded")
    assert not (run_copy / "splits.csv").exists()


# --------------------------------------------------------------------------- 2. manifest paths


@pytest.fixture
def opened(monkeypatch):
    """Every path opened through `open` (builtins, io, pathlib and PIL all use it) while the test runs."""
    seen: list[str] = []
    real = builtins.open

    def recording_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            seen.append(os.path.realpath(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(io, "open", recording_open)
    return seen


def outside_copy(run: Path, tmp: Path) -> tuple[Path, str]:
    """A real generated PNG copied outside the run, and its sha256."""
    row = manifest(run)[0]
    outside = tmp / "elsewhere" / "stolen.png"
    write(outside, (run / "round-01/generate" / row["path"]).read_bytes())
    return outside, row["sha256"]


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_a_manifest_path_leaving_the_generate_folder_is_refused_unopened(kind, run_copy, tmp_path, capsys, opened):
    back_to(run_copy, "filter")
    outside, sha = outside_copy(run_copy, tmp_path)
    rows = manifest(run_copy)
    gen = run_copy / "round-01/generate"
    if kind == "dotdot":
        rows[0]["path"] = os.path.relpath(outside, gen)  # ../../../elsewhere/stolen.png, sha256 of that file
    elif kind == "absolute":
        rows[0]["path"] = str(outside)
    else:
        (gen / rows[0]["path"]).unlink()
        (gen / rows[0]["path"]).symlink_to(outside)
    rows[0]["sha256"] = sha
    write_manifest(run_copy, rows)
    before = snapshot(run_copy) if kind != "symlink" else None
    opened.clear()  # from here on, only what `vsi` opens
    line = assert_refused(vsi(capsys, "filter", run_copy, "--quiet"), "manifest.jsonl:1", "leaves the generation folder")
    assert str(outside) not in opened, line  # refused before the file was opened
    assert not (run_copy / "round-01/filter").exists()
    if before is not None:
        assert snapshot(run_copy) == before


def test_a_manifest_row_pointing_at_a_system_file_is_refused_unopened(run_copy, capsys, opened):
    back_to(run_copy, "filter")
    rows = manifest(run_copy)
    rows[1]["path"] = "../../../../../../../../etc/passwd"
    write_manifest(run_copy, rows)
    opened.clear()
    assert_refused(vsi(capsys, "resume", run_copy, "--quiet"), "manifest.jsonl:2", "etc/passwd")
    assert "/etc/passwd" not in opened
    assert not (run_copy / "round-01/filter").exists()


# --------------------------------------------------------------------------- 3. generated images replaced


@pytest.mark.parametrize(("stage", "command"), [("filter", "filter"), ("gate", "gate"), (None, "resume")])
def test_a_replaced_generated_image_is_refused_by_name(stage, command, run_copy, capsys):
    """Read back for the filter, for the gate, and (a finished run resumed) for the pool and the final checks."""
    if stage is not None:
        back_to(run_copy, stage)
    row = manifest(run_copy)[2]
    png = run_copy / "round-01/generate" / row["path"]
    write(png, png_bytes(31337, size=16))  # a valid PNG of the right size: only the sha256 tells it apart
    before = snapshot(run_copy)
    assert_refused(vsi(capsys, command, run_copy, "--quiet"), str(png), "sha256", row["id"])
    assert snapshot(run_copy) == before
    if stage is not None:
        assert not (run_copy / "round-01" / stage).exists()


# --------------------------------------------------------------------------- 4./5. YAML bombs and deep nesting

ANCHORS = ['&a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'] + [
    f"&{name} [{', '.join([f'*{prev}'] * 9)}]" for prev, name in zip("abcdefg", "bcdefgh", strict=True)]
BOMB = "[" + ", ".join(ANCHORS) + ", *h]"  # 9^8 ≈ 43 million strings once expanded: gigabytes if copied


def _limited() -> None:  # a regression must fail the test (MemoryError, exit 1), not exhaust the shared machine
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def run_process(*args: str) -> tuple[int, str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "vision_si.cli", *map(str, args)], env=env, capture_output=True,
                         text=True, timeout=300, preexec_fn=_limited)
    return out.returncode, out.stderr, time.perf_counter() - t0


@pytest.mark.parametrize("where", ["config", "set", "plan"])
def test_an_alias_bomb_is_refused_quickly(where, tmp_path):
    """Where each bomb sits, something copies or prints it whole (the override step deep-copies the
    config, the run directory's config.yaml is written from a deep copy, a plan's exemplar ids are turned
    into strings): only the bound stops it."""
    cfg = tiny_config(tmp_path, name="bomb")
    if where == "config":
        path = write_config(tmp_path, yaml.safe_dump(cfg).replace(
            "classifier:\n", f"classifier:\n  model_kwargs: {{bomb: {BOMB}}}\n", 1), "bomb.yaml")
        args, needle = ["run", path, "--quiet"], "bomb.yaml"
    elif where == "set":
        args = ["run", write_config(tmp_path, cfg), "--quiet", "--set", f"classifier.model_kwargs={{bomb: {BOMB}}}"]
        needle = "--set classifier.model_kwargs"
    else:
        path = tmp_path / "plan.yaml"
        path.write_text("seed: 0\ndata: {source: digits}\n"
                        f"requests: [{{class: 1, count: 1, mode: exemplar, exemplar_ids: {BOMB}}}]\n")
        args, needle = ["generate", "--plan", path, "--out", tmp_path / "out", "--quiet"], "plan.yaml"
    code, err, seconds = run_process(*args)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    assert "alias bomb" in err and "100,000" in err
    assert seconds < 60  # the whole process, imports included; the check itself takes milliseconds
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert not (tmp_path / "out").exists()


DEEP = "[" * 3000 + "]" * 3000


@pytest.mark.parametrize("where", ["config", "set", "yaml_plan", "json_plan", "recursive_alias"])
def test_deep_nesting_is_refused_in_one_line(where, tmp_path, capsys):
    cfg = tiny_config(tmp_path, name="deep")
    if where in ("config", "recursive_alias"):
        value = DEEP if where == "config" else "&loop [1, *loop]"
        path = write_config(tmp_path, yaml.safe_dump(cfg).replace(
            "classifier:\n", f"classifier:\n  model_kwargs: {{x: {value}}}\n", 1))
        args, needles = ["run", path, "--quiet"], ["cfg.yaml"]
    elif where == "set":
        args, needles = ["run", write_config(tmp_path, cfg), "--quiet", "--set", f"classifier.model_kwargs={{x: {DEEP}}}"], \
            ["--set classifier.model_kwargs"]
    elif where == "yaml_plan":
        path = tmp_path / "plan.yaml"
        path.write_text(f"seed: 0\ndata: {{source: digits, extra: {DEEP}}}\nrequests: [{{class: 1, count: 1}}]\n")
        args, needles = ["generate", "--plan", path, "--out", tmp_path / "out", "--quiet"], ["plan.yaml"]
    else:
        path = tmp_path / "plan.json"
        path.write_text('{"seed": 0, "deep": ' + "[" * 100_000 + "]" * 100_000 + ', "requests": [{"class": 1, "count": 1}]}')
        args, needles = ["generate", "--plan", path, "--out", tmp_path / "out", "--quiet"], ["plan.json"]
    res = vsi(capsys, *args)
    line = assert_refused(res, *needles, runs=tmp_path / "runs")
    assert ("recursive alias" in line) if where == "recursive_alias" else ("nested" in line), line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 6. corrupt partial generator checkpoint


class Payload:
    """Unpickling this creates `marker`: its existence would prove the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _corrupt(checkpoint: Path, what: str, marker: Path) -> Path:
    if what == "pickle_as_unet_weights":
        target = checkpoint / "unet" / "diffusion_pytorch_model.safetensors"
        target.write_bytes(pickle.dumps({"w": Payload(marker)}))
    elif what == "truncated_optimizer":
        target = checkpoint / "optimizer.safetensors"
        target.write_bytes(target.read_bytes()[:100])
    else:
        target = checkpoint / "state.json"
        target.write_text('{"step": 10, "losses": "not a list"')
    return target


@pytest.mark.parametrize("what", ["pickle_as_unet_weights", "truncated_optimizer", "garbage_state"])
def test_a_corrupt_partial_generator_checkpoint_is_named_discarded_and_retrained(what, run_copy, tmp_path, capsys,
                                                                                  monkeypatch):
    from vision_si.generators import ddpm

    reference = manifest(run_copy)
    shutil.rmtree(run_copy / "round-01")
    back_to_final = [run_copy / "final", run_copy / "summary.json", run_copy / "report.html"]
    shutil.rmtree(back_to_final[0])
    for p in back_to_final[1:]:
        p.unlink()
    cfg = yaml.safe_load((run_copy / "config.yaml").read_text())
    cfg["generate"]["cache_dir"] = str(tmp_path / "gen-cache")  # cold and private: the generator trains here
    (run_copy / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    real_save = ddpm._save_checkpoint

    def save_then_die(*args, **kwargs):  # the kill lands right after the first partial checkpoint
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(ddpm, "_save_checkpoint", save_then_die)
    code, err, _ = run_vsi(capsys, "generate", run_copy, "--quiet")
    assert code == 130, err
    monkeypatch.setattr(ddpm, "_save_checkpoint", real_save)
    (checkpoint,) = (tmp_path / "gen-cache").glob("*.partial/checkpoint")
    marker = tmp_path / "PWNED"
    target = _corrupt(checkpoint, what, marker)

    with pytest.warns(UserWarning) as caught:
        code, err, _ = run_vsi(capsys, "generate", run_copy, "--quiet")
    assert code == 0, err
    named = [str(w.message) for w in caught if "generator checkpoint" in str(w.message)]
    assert len(named) == 1 and named[0].startswith(f"{target}: unreadable") and "discarded" in named[0], named
    assert "internal error" not in err and "Traceback" not in err
    assert not marker.exists()
    # retrained from step 0 to the very weights and images of the uninterrupted run
    again = manifest(run_copy)
    assert [r["generator_sha256"] for r in again] == [r["generator_sha256"] for r in reference]
    assert [r["sha256"] for r in again] == [r["sha256"] for r in reference]
    assert not list((tmp_path / "gen-cache").glob("*.partial"))


# --------------------------------------------------------------------------- 7. skipped_images.csv


def test_every_file_left_out_is_listed_counted_and_reported(tmp_path, capsys):
    root = image_folder(tmp_path / "data", {"a": 10, "b": 10, "c": 10})
    write(root / "c" / "dup.png", (root / "a" / "000.png").read_bytes())  # same bytes in two classes: both go
    write(root / "b" / "010.png", (root / "b" / "001.png").read_bytes())  # a repeat within a class: the later goes
    write(root / "a" / "broken.png", b"\x89PNG\r\n\x1a\n not really")  # unreadable
    cfg = write_config(tmp_path, tiny_config(tmp_path, name="skip", classifier={"steps": 2, "batch_size": 8},
                                             data={"source": "imagefolder", "root": str(root), "image_size": 16,
                                                   "on_bad_image": "skip", "max_per_class": None,
                                                   # val images of every class on both val halves
                                                   "split": {"val_fraction": 0.5}}))
    with warnings.catch_warnings():  # warnings to stderr as the console script shows them, not to pytest
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(message, category, filename, lineno))
        code, err, _ = run_vsi(capsys, "run", cfg)  # with progress bars: the warnings must not share their lines
    assert code == 0, err
    (run,) = (tmp_path / "runs").iterdir()
    import csv

    with open(run / "skipped_images.csv", newline="") as fh:
        listed = {Path(r["path"]).relative_to(root).as_posix(): r["reason"] for r in csv.DictReader(fh)}
    assert set(listed) == {"a/000.png", "c/dup.png", "b/010.png", "a/broken.png"}, listed
    assert "two classes" in listed["a/000.png"] and "two classes" in listed["c/dup.png"]
    assert "duplicates" in listed["b/010.png"] and "b/001.png" in listed["b/010.png"]
    assert "broken.png" in listed["a/broken.png"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dataset"]["skipped_images"] == 4
    assert summary["dataset"]["n_images"] == 30 + 3 - 4
    split_ids = {line.split(",")[0] for line in (run / "splits.csv").read_text().splitlines()[1:]}
    assert not split_ids & set(listed)
    assert "<b>4</b> image file(s) left out" in (run / "report.html").read_text()
    shown = [line for line in err.split("\n") if "skipped:" in line or "duplicates" in line]
    assert len(shown) == 4, err
    for line in shown:
        assert line.startswith("warning: ") and "\r" not in line and "it/s" not in line, repr(line)


# --------------------------------------------------------------------------- the smaller things


def test_a_removed_run_directory_is_said_to_be_removed(tmp_path, capsys):
    cfg = folder_case(tmp_path, {"a/cut.png": b"\x89PNG\r\n\x1a\n cut"})
    code, err, _ = run_vsi(capsys, "run", cfg)  # not quiet: the run directory line is printed
    assert code == 2
    (line,) = [x for x in err.splitlines() if x.startswith("run directory:")]
    run = line.split(": ", 1)[1]
    assert f"run directory {run} removed" in err and not Path(run).exists()


def test_a_bad_pretrained_file_is_named_before_the_data_loads(tmp_path, capsys, monkeypatch):
    import vision_si.data.real

    def no_data(*_a, **_k):
        raise AssertionError("the data was loaded before the weights file was checked")

    monkeypatch.setattr(vision_si.data.real, "load_source", no_data)
    weights = write(tmp_path / "weights.safetensors", b"not safetensors at all")
    cfg = write_config(tmp_path, tiny_config(tmp_path, name="pre", classifier={"pretrained": str(weights)}))
    assert_refused(vsi(capsys, "train", cfg, "--quiet"), "classifier.pretrained", "weights.safetensors",
                   runs=tmp_path / "runs")


def test_a_config_path_that_is_a_folder_is_called_a_folder(tmp_path, capsys):
    assert_refused(vsi(capsys, "run", tmp_path, "--quiet"), str(tmp_path), "is a folder")
    assert_refused(vsi(capsys, "generate", "--plan", tmp_path, "--out", tmp_path / "o"), str(tmp_path), "is a folder")


def test_the_decompression_bomb_message_quotes_the_documented_limit():
    from test_bad_input import bomb_png

    from vision_si.data import MAX_PIXELS, decode_image
    from vision_si.errors import DataError

    with pytest.raises(DataError) as info:
        decode_image(bomb_png(100_000, 100_000), name="bomb.png")
    assert f"limit of {MAX_PIXELS} pixels" in str(info.value) and "10000000000 pixels" in str(info.value)
    assert "178956970" not in str(info.value)  # PIL's own limit is not the one this package documents


def test_the_cached_generator_is_read_from_safetensors_only(finished_run, tmp_path, capfd):
    """A cached generator whose weights are a pickled `.bin` (even a benign one, the very same weights) is
    refused by name: diffusers would otherwise print "Defaulting to unsafe serialization" and unpickle it."""
    import safetensors.torch
    import torch

    from vision_si.errors import DataError
    from vision_si.generators.ddpm import DDPMGenerator

    cfg = yaml.safe_load((finished_run / "config.yaml").read_text())
    (folder,) = (p.parent for p in Path(cfg["generate"]["cache_dir"]).glob("*/meta.json"))
    private = tmp_path / folder.name
    shutil.copytree(folder, private)
    unet = private / "pipeline" / "unet"
    assert DDPMGenerator.load(private).checkpoint_sha256 == manifest(finished_run)[0]["generator_sha256"]
    weights = safetensors.torch.load_file(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(weights, unet / "diffusion_pytorch_model.bin")
    capfd.readouterr()
    with pytest.raises(DataError, match="cannot load the cached generator"):
        DDPMGenerator.load(private)
    out, err = capfd.readouterr()
    assert "unsafe serialization" not in out + err
