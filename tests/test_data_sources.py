"""Every source on small data built here, and every bad input giving one error that names the file."""

from __future__ import annotations

import importlib.util
import os
import warnings

import numpy as np
import pytest
from conftest import write_image

from vision_si.config import DataConfig
from vision_si.data import (
    ELPV_CLASSES,
    BadImageWarning,
    load_csv,
    load_digits,
    load_elpv,
    load_imagefolder,
    load_medmnist,
    load_source,
)
from vision_si.errors import DataError

# ------------------------------------------------------------------ imagefolder


def test_imagefolder_reads_nested_files_and_sorts_classes(image_folder, tmp_path):
    root = image_folder({"zebra": 3, "ant": 2})
    write_image(root / "zebra" / "deep" / "er" / "x.JPG", 99, mode="RGB", fmt="JPEG")
    write_image(root / "ant" / "y.bmp", 98)
    write_image(root / "ant" / "z.tif", 97)
    (root / "ant" / "readme.txt").write_text("ignored")
    write_image(root / "ant" / ".hidden" / "h.png", 96)
    table = load_imagefolder(root, progress=False)
    assert table.classes == ["ant", "zebra"]
    assert table.class_counts().tolist() == [4, 4]
    assert "zebra/deep/er/x.JPG" in table.ids
    assert not any(".hidden" in i for i in table.ids)
    assert table.channels == 3  # one colour image makes the data colour
    k = table.ids.index("ant/y.bmp")
    assert table.labels[k] == 0 and table.load(k).shape == (12, 12, 1)
    assert all(len(h) == 64 for h in table.sha256)


def test_imagefolder_empty_class_folder_is_an_error_or_skipped(image_folder):
    root = image_folder({"a": 3, "b": 3})
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="empty.*no images"):
        load_imagefolder(root, progress=False)
    with pytest.warns(BadImageWarning, match="empty"):
        table = load_imagefolder(root, on_bad_image="skip", progress=False)
    assert table.classes == ["a", "b"]
    assert len(table.skipped) == 1 and table.skipped[0]["path"].endswith("empty")


@pytest.mark.parametrize("kind", ["zero", "text", "truncated"])
def test_bad_image_files_error_or_skip_with_a_record(image_folder, kind):
    root = image_folder({"a": 3, "b": 3})
    bad = root / "b" / "bad.png"
    if kind == "zero":
        bad.write_bytes(b"")
    elif kind == "text":
        bad.write_text("<html>not an image</html>")
    else:
        data = (root / "a" / "000.png").read_bytes()
        bad.write_bytes(data[: len(data) - 30])
    with pytest.raises(DataError, match="bad.png"):
        load_imagefolder(root, progress=False)
    with pytest.warns(BadImageWarning, match="bad.png"):
        table = load_imagefolder(root, on_bad_image="skip", progress=False)
    assert len(table) == 6 and "b/bad.png" not in table.ids
    assert [s["path"] for s in table.skipped] == [str(bad)]


def test_duplicate_across_classes_names_both_files(image_folder):
    root = image_folder({"a": 3, "b": 3})
    (root / "b" / "copy.png").write_bytes((root / "a" / "001.png").read_bytes())
    with pytest.raises(DataError, match=r"(?s)copy\.png.*a/001\.png|a/001\.png.*copy\.png") as info:
        load_imagefolder(root, progress=False)
    assert "'a'" in str(info.value) and "'b'" in str(info.value)
    with pytest.warns(BadImageWarning):
        table = load_imagefolder(root, on_bad_image="skip", progress=False)
    assert "b/copy.png" not in table.ids and "a/001.png" not in table.ids  # neither label can be trusted


def test_duplicate_within_a_class_keeps_one_with_a_warning(image_folder):
    root = image_folder({"a": 3, "b": 3})
    (root / "a" / "zz_copy.png").write_bytes((root / "a" / "001.png").read_bytes())
    with pytest.warns(UserWarning, match="zz_copy.png.*001.png"):
        table = load_imagefolder(root, progress=False)
    assert "a/001.png" in table.ids and "a/zz_copy.png" not in table.ids
    assert len(set(table.sha256)) == len(table) == 6


def test_missing_root_and_root_without_classes(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        load_imagefolder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "a.png", 0)
    with pytest.raises(DataError, match="no class folders"):
        load_imagefolder(tmp_path / "flat")


# ------------------------------------------------------------------ csv


def make_csv_dataset(tmp_path, rows: list[str], header: str = "path,label,group,scanner"):
    root = tmp_path / "ds"
    for i in range(6):
        write_image(root / "img" / f"{i}.png", i)
    (root / "labels.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return root / "labels.csv"


def test_csv_source_reads_groups_metadata_and_numeric_labels(tmp_path):
    rows = [f"img/{i}.png,{[2, 10, 2, 10, 2, 10][i]},p{i // 2},S{i % 2}" for i in range(6)]
    table = load_csv(make_csv_dataset(tmp_path, rows), progress=False)
    assert table.classes == ["2", "10"]  # numeric order, not "10" < "2"
    assert table.ids[0] == "img/0.png" and table.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert table.groups == ["p0", "p0", "p1", "p1", "p2", "p2"]
    assert table.metadata[1] == {"scanner": "S1"}
    assert table.load(3).shape == (12, 12, 1)


@pytest.mark.parametrize("bad_path", ["../outside.png", "ABSOLUTE", "img/../../outside.png", "link.png"])
def test_csv_paths_escaping_the_root_are_refused_naming_the_row(tmp_path, bad_path):
    outside = write_image(tmp_path / "outside.png", 50)
    root = tmp_path / "ds"
    root.mkdir()
    if bad_path == "ABSOLUTE":
        bad_path = str(outside)
    if bad_path == "link.png":
        os.symlink(outside, root / "link.png")
    rows = ["img/0.png,a", "img/1.png,a", f"{bad_path},b"]
    csv_path = make_csv_dataset(tmp_path, rows, header="path,label")
    with pytest.raises(DataError, match=r"row 4 .*leaves the dataset root"):
        load_csv(csv_path, progress=False)
    with pytest.raises(DataError, match="leaves the dataset root"):  # never skippable
        load_csv(csv_path, on_bad_image="skip", progress=False)


def test_csv_row_naming_no_image_errors_or_is_skipped(tmp_path):
    csv_path = make_csv_dataset(tmp_path, ["img/0.png,a", "img/missing.png,a", "img/2.png,b"], header="path,label")
    with pytest.raises(DataError, match=r"row 3 of .*labels\.csv \(img/missing\.png\).*no such image"):
        load_csv(csv_path, progress=False)
    with pytest.warns(BadImageWarning):
        table = load_csv(csv_path, on_bad_image="skip", progress=False)
    assert table.ids == ["img/0.png", "img/2.png"] and len(table.skipped) == 1


def test_csv_that_is_not_utf8_or_lacks_columns(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("path,label\nimg/é.png,a\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv.*not UTF-8"):
        load_csv(path)
    path = tmp_path / "cols.csv"
    path.write_text("file,class\na.png,a\n")
    with pytest.raises(DataError, match=r"cols\.csv.*'path' and 'label'"):
        load_csv(path)


def test_csv_same_file_with_two_labels_names_both_rows(tmp_path):
    csv_path = make_csv_dataset(tmp_path, ["img/0.png,a", "img/1.png,a", "img/0.png,b"], header="path,label")
    with pytest.raises(DataError, match=r"row 4 .*also labelled 'a'.*row 2"):
        load_csv(csv_path, progress=False)


# ------------------------------------------------------------------ medmnist, digits, elpv


def write_npz(path, sizes=(12, 4, 6), shape=(8, 8), classes=3, seed=0, **extra):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % classes).reshape(-1, 1).astype(np.uint8)
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


def test_medmnist_npz_keeps_its_split(tmp_path):
    table = load_medmnist(write_npz(tmp_path / "tiny.npz"))
    assert len(table) == 22 and table.classes == ["0", "1", "2"]
    assert table.source_splits.count("train") == 12 and table.source_splits.count("test") == 6
    assert table.ids[12] == "medmnist:val:000000"
    with np.load(tmp_path / "tiny.npz") as z:
        np.testing.assert_allclose(table.load(12)[:, :, 0], z["val_images"][0] / 255.0)
    assert table.channels == 1 and table.in_memory


def test_medmnist_bad_files(tmp_path):
    with pytest.raises(DataError, match="nothere.npz"):
        load_medmnist(tmp_path / "nothere.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"junk\.npz.*not a readable"):
        load_medmnist(tmp_path / "junk.npz")
    np.savez(tmp_path / "multi.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros((2, 14)))
    with pytest.raises(DataError, match=r"multi\.npz.*multi-label"):
        load_medmnist(tmp_path / "multi.npz")
    np.savez(tmp_path / "keys.npz", x=np.zeros(3))
    with pytest.raises(DataError, match=r"keys\.npz.*train_images"):
        load_medmnist(tmp_path / "keys.npz")


def test_digits_source():
    table = load_digits()
    assert len(table) == 1797 and table.classes == [str(k) for k in range(10)]
    from sklearn.datasets import load_digits as sk_digits

    img = table.load(5)
    assert img.shape == (8, 8, 1) and img.dtype == np.float32
    np.testing.assert_allclose(img[:, :, 0], sk_digits().images[5] / 16.0)
    assert max(table.load(i).max() for i in range(20)) == 1.0  # 16 maps to exactly 1


needs_elpv = pytest.mark.skipif(importlib.util.find_spec("elpv_dataset") is None, reason="elpv extra not installed")


@needs_elpv
def test_elpv_source_with_a_cap():
    table = load_source(DataConfig(source="elpv", max_per_class=5), seed=3, progress=False)
    assert table.classes == ELPV_CLASSES
    assert table.class_counts().tolist() == [5, 5, 5, 5]
    assert all(i.startswith("elpv:cell") for i in table.ids)
    assert {m["type"] for m in table.metadata} <= {"mono", "poly"}
    assert table.load(0).shape == (300, 300, 1)
    again = load_source(DataConfig(source="elpv", max_per_class=5), seed=3, progress=False)
    other = load_source(DataConfig(source="elpv", max_per_class=5), seed=4, progress=False)
    assert again.ids == table.ids and other.ids != table.ids


def test_elpv_without_the_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "elpv_dataset" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install elpv-dataset.*pip install -e '\.\[elpv\]'"):
        load_elpv()


# ------------------------------------------------------------------ load_source


def test_load_source_dispatches_and_caps_by_seed(image_folder, tmp_path):
    root = image_folder({"a": 8, "b": 5})
    cfg = DataConfig(source="imagefolder", root=str(root), max_per_class=4)
    t1 = load_source(cfg, seed=0, progress=False)
    assert t1.class_counts().tolist() == [4, 4]
    assert load_source(cfg, seed=0, progress=False).ids == t1.ids
    digits = load_source(DataConfig(source="digits", max_per_class=3), seed=1)
    assert digits.class_counts().tolist() == [3] * 10
    assert digits.load(0).shape == (8, 8, 1)
    with pytest.raises(DataError, match="data.root is required"):
        load_source(DataConfig(source="imagefolder"), seed=0)
    with pytest.raises(DataError, match="data.npz is required"):
        load_source(DataConfig(source="medmnist"), seed=0)


def test_skip_mode_records_every_dropped_file(image_folder):
    root = image_folder({"a": 3, "b": 3})
    (root / "a" / "zero.png").write_bytes(b"")
    (root / "b" / "text.jpg").write_text("nope")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = load_source(DataConfig(source="imagefolder", root=str(root), on_bad_image="skip"), 0, progress=False)
    assert sorted(os.path.basename(s["path"]) for s in table.skipped) == ["text.jpg", "zero.png"]
    assert sum(issubclass(w.category, BadImageWarning) for w in caught) == 2
    assert len(table) == 6


def test_tables_pickle_for_worker_processes(image_folder):
    import pickle

    table = load_imagefolder(image_folder({"a": 3, "b": 3}), progress=False).subset([4, 1])
    clone = pickle.loads(pickle.dumps(table))
    np.testing.assert_array_equal(clone.load(0), table.load(0))
    assert clone.ids == table.ids == ["b/001.png", "a/001.png"]
    digits = load_digits().subset([7])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(digits)).load(0), digits.load(0))
