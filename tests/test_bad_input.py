"""Bad input corpus: every kind is built here, run through the real `vsi` entry point, and must give
exit code 2 with one line naming the culprit, no traceback, and no half-written run directory.

Valid-but-unusual inputs (16-bit and float TIFFs, CMYK, alpha, palettes, mixed channels, extra CSV
columns) are asserted to *work*.

The CLI runs in-process (`vision_si.cli.main` with its own argv) so ~60 invocations fit in seconds;
`test_subprocess_cli_matches_in_process` runs three of them as real `python -m vision_si.cli`
processes to show the two agree (same exit code, one stderr line, no warnings or progress noise).

Policy checked here for "no half-written run": a *new* run that stops on bad input before its first
stage completes removes its run directory (`vision_si.loop.run_loop`); a resumed run is never removed.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from cli_helpers import run_vsi
from PIL import Image
from tiny_run import copy_run, forge_splits, make_run, merge, tiny_config

SIZE = 12  # pixels of the images the corpus writes


# --------------------------------------------------------------------------- running the CLI


@dataclass
class Result:
    code: int
    err: str
    out: str


def vsi(capsys, *args) -> Result:
    """`vsi ARGS` through `vision_si.cli.main`, exactly as the console script calls it."""
    return Result(*run_vsi(capsys, *args))


def assert_refused(res: Result, *needles: str, runs: Path | None = None) -> str:
    """Exit 2, exactly one stderr line starting `error:` that contains every needle, no traceback."""
    assert res.code == 2, f"exit {res.code}: {res.err}{res.out}"
    lines = res.err.strip().splitlines()
    assert len(lines) == 1, res.err
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert "Traceback" not in res.err + res.out and "internal error" not in res.err
    if runs is not None:  # a new run stopped by bad input leaves no run directory behind
        assert not runs.exists() or not any(runs.iterdir()), sorted(p.name for p in runs.iterdir())
    return lines[0]


# --------------------------------------------------------------------------- building inputs


def rand_array(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def png_bytes(seed: int, mode: str = "L", size: int = SIZE) -> bytes:
    shape = (size, size) if mode == "L" else (size, size, 3)
    buf = io.BytesIO()
    Image.fromarray(rand_array(seed, shape)).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(seed: int, mode: str = "RGB", size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rand_array(seed, (size, size, 3))).convert(mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG header declaring `width`×`height` gray pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def bad_crc_png(seed: int) -> bytes:
    data = bytearray(png_bytes(seed))
    at = data.index(b"IDAT") + 8  # inside the compressed pixels: the chunk's CRC no longer matches
    data[at] ^= 0xFF
    return bytes(data)


def tiff_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="TIFF")
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def image_folder(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    for k, (cls, n) in enumerate(counts.items()):
        for i in range(n):
            write(root / cls / f"{i:03d}.png", png_bytes(seed * 1000 + k * 100 + i))
    return root


def base_config(tmp: Path, data_keys: dict, **sections) -> dict:
    """The tiny run config on the data source `data_keys`, with two classifier steps and `sections` merged in."""
    cfg = tiny_config(tmp, name="corpus", classifier={"steps": 2, "batch_size": 8, "predict_batch_size": 64})
    cfg["data"] = {k: v for k, v in cfg["data"].items() if k not in ("source", "max_per_class")} | data_keys
    return merge(cfg, sections)


def write_config(tmp: Path, cfg: dict | str, name: str = "cfg.yaml") -> Path:
    path = tmp / name
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg), encoding="utf-8")
    return path


def folder_case(tmp: Path, extra: dict[str, bytes]) -> Path:
    """Three good classes of five images, plus `extra` files (relative path → bytes) under the root."""
    root = image_folder(tmp / "data", {"a": 5, "b": 5, "c": 5})
    for rel, data in extra.items():
        write(root / rel, data)
    return write_config(tmp, base_config(tmp, {"source": "imagefolder", "root": str(root)}))


def csv_case(tmp: Path, rows: list[str] | bytes, header: str = "path,label") -> Path:
    """A CSV source over a folder of good images; `rows` are appended after three good classes."""
    root = tmp / "data"
    good = []
    for k, cls in enumerate("abc"):
        for i in range(4):
            write(root / "img" / f"{cls}{i}.png", png_bytes(100 * k + i))
            good.append(f"img/{cls}{i}.png,{cls}")
    if isinstance(rows, bytes):
        text = ("\n".join([header, *good]) + "\n").encode() + rows
    else:
        text = ("\n".join([header, *good, *rows]) + "\n").encode()
    write(root / "labels.csv", text)
    return write_config(tmp, base_config(tmp, {"source": "csv", "csv": str(root / "labels.csv")}))


# --------------------------------------------------------------------------- broken images (imagefolder)

IMAGE_CASES = {
    "zero_byte_png": ({"a/zero.png": b""}, ["zero.png", "empty file"]),
    "truncated_png": ({"a/cut.png": png_bytes(7, size=64)[:200]}, ["cut.png", "truncated"]),
    "truncated_jpeg": ({"b/cut.jpg": jpeg_bytes(8, size=64)[:400]}, ["cut.jpg"]),
    "text_named_png": ({"a/notes.png": b"these are my notes, not an image\n"}, ["notes.png", "not an image"]),
    "html_named_jpeg": ({"c/page.jpg": b"<!doctype html><html><body>404</body></html>"}, ["page.jpg"]),
    "png_bad_crc": ({"b/crc.png": bad_crc_png(9)}, ["crc.png"]),
    "decompression_bomb_header": ({"a/bomb.png": bomb_png(100_000, 100_000)}, ["bomb.png", "decompression bomb",
                                                                                   "limit of 64000000 pixels"]),
    "float_tiff_with_nan": ({"c/nan.tif": tiff_bytes(np.full((SIZE, SIZE), np.nan, np.float32))}, ["nan.tif", "NaN"]),
    "empty_class_folder": ({"d/readme.txt": b"no images here"}, ["'d'", "no images"]),
    "one_image_class": ({"d/only.png": png_bytes(11)}, ["class 'd'", "1 image"]),
    "two_image_class": ({"d/0.png": png_bytes(12), "d/1.png": png_bytes(13)}, ["class 'd'", "2 image"]),
    "same_bytes_in_two_classes": ({"c/dup.png": png_bytes(0 * 1000 + 0 * 100 + 0)}, ["dup.png", "two classes"]),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_broken_images_are_refused_by_name(case, tmp_path, capsys):
    extra, needles = IMAGE_CASES[case]
    cfg = folder_case(tmp_path, extra)
    assert_refused(vsi(capsys, "run", cfg, "--quiet"), *needles, runs=tmp_path / "runs")


def test_enormous_real_image_is_refused_before_decoding(tmp_path, capsys):
    buf = io.BytesIO()
    Image.new("L", (8200, 8000)).save(buf, format="PNG")  # 65.6 Mpx of zeros: small file, huge decode
    cfg = folder_case(tmp_path, {"b/huge.png": buf.getvalue()})
    assert_refused(vsi(capsys, "run", cfg, "--quiet"), "huge.png", "8200x8000", runs=tmp_path / "runs")


def test_missing_root_and_root_without_class_folders(tmp_path, capsys):
    cfg = write_config(tmp_path, base_config(tmp_path, {"source": "imagefolder", "root": str(tmp_path / "nope")}))
    assert_refused(vsi(capsys, "run", cfg, "--quiet"), "data.root", "nope", runs=tmp_path / "runs")
    flat = tmp_path / "flat"
    write(flat / "x.png", png_bytes(1))
    cfg = write_config(tmp_path, base_config(tmp_path, {"source": "imagefolder", "root": str(flat)}))
    assert_refused(vsi(capsys, "run", cfg, "--quiet"), "flat", "no class folders", runs=tmp_path / "runs")


# --------------------------------------------------------------------------- label files (csv source)

CSV_CASES = {
    "missing_file": (["img/ghost.png,a"], ["ghost.png", "no such image file"]),
    "path_traversal": (["../../etc/passwd,a"], ["etc/passwd", "leaves the dataset root"]),
    "absolute_path_outside": (["/etc/hostname,b"], ["/etc/hostname", "leaves the dataset root"]),
    "empty_label": (["img/a0.png,"], ["labels.csv", "empty path or label"]),
    "same_file_two_labels": (["img/a1.png,b"], ["a1.png", "also labelled"]),
    "non_utf8_bytes": (b"img/\xe9t\xe9.png,a\n", ["labels.csv", "not UTF-8"]),
}


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_bad_label_rows_are_refused_by_name(case, tmp_path, capsys):
    rows, needles = CSV_CASES[case]
    cfg = csv_case(tmp_path, rows)
    assert_refused(vsi(capsys, "run", cfg, "--quiet"), *needles, runs=tmp_path / "runs")


def test_symlink_leaving_the_root_is_refused(tmp_path, capsys):
    outside = write(tmp_path / "elsewhere" / "secret.png", png_bytes(77))
    cfg = csv_case(tmp_path, ["img/link.png,a"])
    (tmp_path / "data" / "img" / "link.png").symlink_to(outside)
    assert_refused(vsi(capsys, "run", cfg, "--quiet"), "link.png", "leaves the dataset root", runs=tmp_path / "runs")


@pytest.mark.parametrize(("header", "needles"), [("file,class", ["'path' and 'label'"]), ("", ["'path' and 'label'"])])
def test_label_file_without_the_needed_columns(header, needles, tmp_path, capsys):
    cfg = csv_case(tmp_path, [], header=header)
    if not header:
        (tmp_path / "data" / "labels.csv").write_bytes(b"")  # a zero-byte label file
    assert_refused(vsi(capsys, "run", cfg, "--quiet"), "labels.csv", *needles, runs=tmp_path / "runs")


def test_grouped_split_too_small_for_its_folds(tmp_path, capsys):
    root = tmp_path / "data"
    rows = []
    for k, cls in enumerate("ab"):
        for i in range(3):
            write(root / f"{cls}{i}.png", png_bytes(10 * k + i))
            rows.append(f"{cls}{i}.png,{cls},patient{k}{i}")
    write(root / "labels.csv", ("path,label,group\n" + "\n".join(rows) + "\n").encode())
    cfg = write_config(tmp_path, base_config(tmp_path, {"source": "csv", "csv": str(root / "labels.csv")}))
    assert_refused(vsi(capsys, "run", cfg, "--quiet"), "'test' split", "4 group folds", runs=tmp_path / "runs")


def test_missing_label_file(tmp_path, capsys):
    cfg = write_config(tmp_path, base_config(tmp_path, {"source": "csv", "csv": str(tmp_path / "labels.csv")}))
    assert_refused(vsi(capsys, "run", cfg, "--quiet"), "data.csv", "labels.csv", runs=tmp_path / "runs")


# --------------------------------------------------------------------------- unusual but valid: must work


def unusual_image(kind: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    gray, rgb = rand_array(seed, (SIZE, SIZE)), rand_array(seed, (SIZE, SIZE, 3))
    return {
        "u16.png": lambda: Image.fromarray(rng.integers(0, 65535, (SIZE, SIZE), dtype=np.uint16)),
        "u16.tif": lambda: Image.fromarray(rng.integers(0, 65535, (SIZE, SIZE), dtype=np.uint16)),
        "f32.tif": lambda: Image.fromarray(rng.random((SIZE, SIZE), dtype=np.float32)),
        "f32_wide_range.tif": lambda: Image.fromarray((rng.random((SIZE, SIZE)) * 4000 - 100).astype(np.float32)),
        "cmyk.jpg": lambda: Image.fromarray(rand_array(seed, (32, 32, 3))).convert("CMYK"),
        "rgba.png": lambda: Image.fromarray(rand_array(seed, (SIZE, SIZE, 4))),
        "la.png": lambda: Image.fromarray(rgb).convert("LA"),
        "palette.png": lambda: Image.fromarray(rgb).convert("P"),
        "bits.png": lambda: Image.fromarray(gray).convert("1"),
        "rgb.bmp": lambda: Image.fromarray(rgb),
        "wide.png": lambda: Image.fromarray(rand_array(seed, (20, 300))),
        "gray.png": lambda: Image.fromarray(gray),
    }[kind]()


UNUSUAL = ["u16.png", "u16.tif", "f32.tif", "f32_wide_range.tif", "cmyk.jpg", "rgba.png", "la.png", "palette.png",
           "bits.png", "rgb.bmp", "wide.png", "gray.png"]


def test_unusual_but_valid_images_and_label_columns_work(tmp_path, capsys):
    """16-bit and float TIFFs, 16-bit PNG, CMYK JPEG, RGBA/LA/palette/1-bit PNGs, BMP, a wide image,
    gray and colour mixed, a unicode class name and extra CSV columns: the run trains (exit 0)."""
    root = tmp_path / "data"
    classes = ["défaut", "ok", "rayure"]
    rows = []
    for i, kind in enumerate(UNUSUAL):
        for k, cls in enumerate(classes):
            (root / cls).mkdir(parents=True, exist_ok=True)
            unusual_image(kind, 10 * i + k).save(root / cls / f"{kind}")
            rows.append(f"{cls}/{kind},{cls},site-{i % 3},note {i}")
    write(root / "labels.csv", ("path,label,site,comment\n" + "\n".join(rows) + "\n").encode("utf-8"))
    cfg = write_config(tmp_path, base_config(tmp_path, {"source": "csv", "csv": str(root / "labels.csv")}))
    res = vsi(capsys, "train", cfg, "--quiet")
    assert res.code == 0, res.err
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "round-00/train/seed-0/model.safetensors").is_file()
    listed = (run / "splits.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert len(listed) == len(UNUSUAL) * len(classes)  # every unusual file made it, none skipped
    assert not (run / "skipped_images.csv").exists()
    meta = json.loads((run / "round-00/train/seed-0/model.json").read_text())
    assert meta["in_chans"] == 3 and meta["classes"] == classes


def test_grayscale_data_forced_to_three_channels_works(tmp_path, capsys):
    root = image_folder(tmp_path / "data", {"a": 4, "b": 4})
    cfg = write_config(tmp_path, base_config(tmp_path, {"source": "imagefolder", "root": str(root), "channels": 3}))
    res = vsi(capsys, "train", cfg, "--quiet")
    assert res.code == 0, res.err
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "round-00/train/seed-0/model.json").read_text())["in_chans"] == 3


# --------------------------------------------------------------------------- run configs (YAML)

DIGITS = {"source": "digits", "max_per_class": 10}


def yaml_cases(tmp: Path) -> dict[str, tuple[str | dict, list[str]]]:
    good = base_config(tmp, DIGITS)

    def with_(section: str, **kv) -> dict:
        cfg = json.loads(json.dumps(good))
        cfg[section].update(kv) if section != "top" else cfg.update(kv)
        return cfg

    return {
        "invalid_yaml": ("classifier: [unclosed\n", ["cfg.yaml", "not valid YAML"]),
        "top_level_list": ("- a\n- b\n", ["cfg.yaml", "mapping at the top level"]),
        "top_level_scalar": ("just a sentence\n", ["cfg.yaml", "mapping at the top level"]),
        "wrong_type_int": (with_("classifier", steps="many"), ["classifier.steps", "integer"]),
        "bool_for_int": (with_("top", seed=True), ["seed", "integer"]),
        "null_not_allowed": (with_("classifier", steps=None), ["classifier.steps", "null"]),
        "unknown_top_key": (with_("top", classifer={"steps": 1}), ["classifer", "did you mean 'classifier'"]),
        "unknown_nested_key": (with_("classifier", stepz=3), ["classifier.stepz", "did you mean 'steps'"]),
        "section_not_mapping": (with_("top", data=5), ["data", "mapping"]),
        "negative_lr": (with_("classifier", lr=-0.1), ["classifier.lr", "-0.1"]),
        "absurd_image_size": (with_("data", image_size=100_000), ["data.image_size", "100000"]),
        "absurd_budget": (with_("diagnose", budget_total=10**9), ["diagnose.budget_total", "1000000000"]),
        "wrong_channels": (with_("data", channels=2), ["data.channels", "2"]),
        "unknown_literal": (with_("data", source="imagenet"), ["data.source", "imagenet"]),
        "missing_card": (with_("data", card="no-such-card.yaml"), ["data.card", "no-such-card.yaml"]),
        "unknown_preset": (with_("generate", preset="gigantic"), ["generate.preset", "gigantic"]),
        "unknown_arch": (with_("classifier", arch="resnet9000"), ["classifier.arch", "resnet9000"]),
        "bad_model_kwargs": (with_("classifier", model_kwargs={"no_such_option": 1}), ["classifier.model_kwargs"]),
        "device_absent": (with_("classifier", device="cuda:7"), ["classifier.device"]),
    }


@pytest.mark.parametrize("case", ["invalid_yaml", "top_level_list", "top_level_scalar", "wrong_type_int", "bool_for_int",
                                  "null_not_allowed", "unknown_top_key", "unknown_nested_key", "section_not_mapping",
                                  "negative_lr", "absurd_image_size", "absurd_budget", "wrong_channels",
                                  "unknown_literal", "missing_card", "unknown_preset", "unknown_arch",
                                  "bad_model_kwargs", "device_absent"])
def test_bad_run_configs_are_refused_by_key(case, tmp_path, capsys):
    if case == "device_absent":
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    content, needles = yaml_cases(tmp_path)[case]
    cfg = write_config(tmp_path, content)
    assert_refused(vsi(capsys, "run", cfg, "--quiet"), *needles, runs=tmp_path / "runs")


def test_non_utf8_config_is_named(tmp_path, capsys):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    assert_refused(vsi(capsys, "run", cfg), "latin1.yaml", "not UTF-8")


def test_budget_larger_than_the_disk_is_refused_before_a_run_exists(tmp_path, capsys):
    cfg = write_config(tmp_path, base_config(tmp_path, {"source": "digits", "max_per_class": 3, "image_size": 1024},
                                             diagnose={"budget_total": 1_000_000}))
    line = assert_refused(vsi(capsys, "run", cfg, "--quiet"), "diagnose.budget_total=1000000", "on disk",
                          runs=tmp_path / "runs")
    assert "GB" in line


def test_budget_larger_than_memory_is_refused(tmp_path, capsys, monkeypatch):
    import psutil

    class Mem:
        available = 2 * 10**9

    class Disk:
        free = 10**15

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Mem())
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: Disk())
    cfg = write_config(tmp_path, base_config(tmp_path, {"source": "digits", "max_per_class": 3, "image_size": 256},
                                             diagnose={"budget_total": 100_000}))
    assert_refused(vsi(capsys, "run", cfg, "--quiet"), "diagnose.budget_total=100000", "memory",
                   runs=tmp_path / "runs")


# --------------------------------------------------------------------------- an existing run directory


@pytest.fixture(scope="module")
def generated_run(tmp_path_factory):
    """A real tiny run on digits, stopped after round 1's generation (train, diagnose, generate complete)."""
    run = make_run(tmp_path_factory.mktemp("corpus_run"), until="generate", name="corpus")
    assert (run / "round-01/generate/manifest.jsonl").is_file()
    return run


@pytest.fixture
def run_copy(generated_run, tmp_path):
    return copy_run(generated_run, tmp_path)


def _other_checkpoint(run: Path, *, arch: str | None = None, classes: list[str] | None = None) -> None:
    """Replace round-00's seed-0 checkpoint by a whole, self-consistent one of another arch or class list."""
    import timm

    from vision_si.classifier import save_checkpoint

    folder = run / "round-00/train/seed-0"
    meta = json.loads((folder / "model.json").read_text())
    meta["arch"] = arch or meta["arch"]
    meta["classes"] = classes or meta["classes"]
    meta["create_kwargs"] = {**meta["create_kwargs"], "num_classes": len(meta["classes"])}
    model = timm.create_model(meta["arch"], pretrained=False, **meta["create_kwargs"])
    meta.pop("weights_sha256")
    save_checkpoint(folder, model.state_dict(), meta)


def test_checkpoint_of_another_architecture_is_refused(run_copy, capsys):
    _other_checkpoint(run_copy, arch="test_resnet")
    assert_refused(vsi(capsys, "resume", run_copy, "--quiet"), "seed-0/model.json", "test_resnet", "resnet10t")
    assert run_copy.is_dir()  # a resumed run is never removed


def test_checkpoint_of_another_class_list_is_refused(run_copy, capsys):
    _other_checkpoint(run_copy, classes=["cat", "dog"])
    assert_refused(vsi(capsys, "resume", run_copy, "--quiet"), "seed-0/model.json", "'cat', 'dog'")


@pytest.mark.parametrize(("damage", "needles"), [
    ("truncate_weights", ["model.safetensors", "sha256"]),
    ("garbage_meta", ["model.json", "not a readable JSON"]),
    ("meta_without_keys", ["model.json", "missing key"]),
])
def test_damaged_checkpoint_is_refused(damage, needles, run_copy, capsys):
    folder = run_copy / "round-00/train/seed-0"
    if damage == "truncate_weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "garbage_meta":
        (folder / "model.json").write_bytes(b"\x00\x01{{{")
    else:
        (folder / "model.json").write_text('{"arch": "resnet10t"}')
    assert_refused(vsi(capsys, "resume", run_copy, "--quiet"), *needles)


def test_edited_run_config_is_refused(run_copy, capsys):
    cfg = yaml.safe_load((run_copy / "config.yaml").read_text())
    cfg["classifier"]["learning_rate"] = 0.1
    (run_copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert_refused(vsi(capsys, "resume", run_copy, "--quiet"), "config.yaml", "classifier.learning_rate")


@pytest.mark.parametrize(("edit", "needles"), [
    (lambda t: t.replace(",train\n", ",holdout\n", 1), ["splits.csv", "split other than"]),
    (lambda t: t.replace("id,source", "ident,source", 1), ["splits.csv", "expected columns"]),
    (lambda t: "\n".join(t.splitlines()[:-3]) + "\n", ["splits.csv", "dataset changed"]),
])
def test_forged_splits_file_is_refused(edit, needles, run_copy, capsys):
    forge_splits(run_copy, edit((run_copy / "splits.csv").read_text()))
    assert_refused(vsi(capsys, "resume", run_copy, "--quiet"), *needles)


def test_forged_image_digest_in_the_splits_is_refused(run_copy, capsys):
    lines = (run_copy / "splits.csv").read_text().splitlines()
    fields = lines[1].split(",")
    fields[2] = "f" * 64  # the recorded sha256 of the first image no longer matches the data
    lines[1] = ",".join(fields)
    forge_splits(run_copy, "\n".join(lines) + "\n")
    assert_refused(vsi(capsys, "resume", run_copy, "--quiet"), "splits.csv", fields[0], "sha256 changed")


def test_changed_image_bytes_since_the_split_are_refused(tmp_path, capsys):
    cfg = folder_case(tmp_path, {})
    assert vsi(capsys, "train", cfg, "--quiet").code == 0
    (run,) = (tmp_path / "runs").iterdir()
    write(tmp_path / "data" / "b" / "002.png", png_bytes(4242))  # an image of the data set edited in place
    assert_refused(vsi(capsys, "resume", run, "--quiet"), "splits.csv", "b/002.png", "sha256 changed")
    assert not (run / "round-00/diagnose").exists()


def test_corrupt_manifest_row_is_refused(run_copy, capsys):
    manifest = run_copy / "round-01/generate/manifest.jsonl"
    lines = manifest.read_text().splitlines()
    lines[1] = '{"id": "syn-r01-000001", "oops": true}'
    manifest.write_text("\n".join(lines) + "\n")
    assert_refused(vsi(capsys, "filter", run_copy, "--quiet"), "manifest.jsonl:2")


def test_corrupt_generated_image_is_refused(run_copy, capsys):
    (first,) = sorted((run_copy / "round-01/generate/images").iterdir())[:1]
    first.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert_refused(vsi(capsys, "filter", run_copy, "--quiet"), first.name)


@pytest.mark.parametrize(("content", "needles"), [
    (b"id,verdict\nsyn-r01-000000,maybe\n", ["reviews.csv", "line 2", "maybe"]),
    (b"id,verdict\n,accept\n", ["reviews.csv", "line 2"]),
    (b"id,verdict\nsyn-r01-000000,r\xe9ject\n", ["reviews.csv", "not UTF-8"]),
])
def test_bad_reviews_file_is_refused(content, needles, run_copy, capsys):
    (run_copy / "reviews.csv").write_bytes(content)
    assert_refused(vsi(capsys, "filter", run_copy, "--quiet"), *needles)
    assert not (run_copy / "round-01/filter").exists()  # the filter stage did not complete on bad input


# --------------------------------------------------------------------------- plan files (vsi generate --plan)


def plan_file(tmp: Path, requests, **top) -> Path:
    content = {"seed": 0, "data": DIGITS | {"image_size": 16, "cache_dir": str(tmp / "cache")},
               "generate": {"preset": "tiny", "batch_size": 8, "cache_dir": str(tmp / "cache" / "gen")},
               **top, "requests": requests}
    path = tmp / "plan.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


@pytest.mark.parametrize(("requests", "needles"), [
    ([{"class": "11", "count": 2}], ["plan.yaml", "requests[0]", "'11'"]),
    ([{"class": 3, "count": 2}, {"class": 42, "count": 1}], ["plan.yaml", "requests[1]", "42"]),
    ([{"class": 3, "count": -2}], ["plan.yaml", "requests[0]", "-2"]),
    ([{"class": 3, "count": 2, "colour": "red"}], ["plan.yaml", "colour"]),
    ([{"class": 3, "count": 2, "mode": "exemplar", "exemplar_ids": ["digits:9999", "nope"]}],
     ["digits:9999", "not training images"]),
    ([{"class": 3, "count": 2, "mode": "guided"}], ["plan.yaml", "guided"]),
    ([{"count": 2}], ["plan.yaml", "requests[0]", "'class'"]),
    ([], ["plan.yaml", "non-empty 'requests'"]),
    ([{"class": 3, "count": "abc"}], ["plan.yaml", "requests[0]", "count", "'abc'"]),
    ([{"class": 3, "count": 2, "mode": "class", "strength": "strong"}], ["plan.yaml", "strength", "'strong'"]),
])
def test_bad_plan_files_are_refused(requests, needles, tmp_path, capsys):
    plan = plan_file(tmp_path, requests)
    res = vsi(capsys, "generate", "--plan", plan, "--out", tmp_path / "out", "--quiet")
    assert_refused(res, *needles)
    assert not list((tmp_path / "out").glob("**/*.png"))


def test_plan_that_is_not_a_mapping_or_missing(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text("[1, 2, 3]")
    assert_refused(vsi(capsys, "generate", "--plan", plan, "--out", tmp_path / "o"), "plan.json", "mapping")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("requests: [{class: caf\u00e9, count: 1}]\n".encode("latin-1"))
    assert_refused(vsi(capsys, "generate", "--plan", latin, "--out", tmp_path / "o"), "latin.yaml", "not UTF-8")
    assert_refused(vsi(capsys, "generate", "--plan", tmp_path / "none.yaml", "--out", tmp_path / "o"), "none.yaml")


# --------------------------------------------------------------------------- the real console entry point


def test_subprocess_cli_matches_in_process(tmp_path):
    """A corpus case as a real process (config and --set cases run as processes in test_cli.py): exit 2,
    exactly one stderr line, no progress bars or warnings around it, no run directory left."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cfg = csv_case(tmp_path, ["../../etc/passwd,a"])
    out = subprocess.run([sys.executable, "-m", "vision_si.cli", "run", str(cfg), "--quiet"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert_refused(Result(out.returncode, out.stderr, out.stdout), "etc/passwd", "leaves the dataset root",
                   runs=tmp_path / "runs")
