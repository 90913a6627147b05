"""`data.split.train_ids`: a run on a subsample of train, with the full data's val and test."""

from __future__ import annotations

import pytest

from vision_si.config import config_from_dict
from vision_si.data.real import load_real_data
from vision_si.errors import DataError


def _cfg(ids_file=None):
    split = {"seed": 0} if ids_file is None else {"seed": 0, "train_ids": str(ids_file)}
    return config_from_dict({"data": {"source": "digits", "max_per_class": 12, "image_size": 8, "split": split}})


def test_listed_train_ids_are_kept_and_val_test_unchanged(tmp_path):
    full = load_real_data(_cfg(), progress=False)
    ids, labels = full.ids("train"), full.labels("train")
    keep = [i for c in range(10) for i in [i for i, y in zip(ids, labels, strict=True) if y == c][:3]]
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("# a comment\n" + "\n".join(keep) + "\n\n")
    (tmp_path / "run").mkdir()
    sub = load_real_data(_cfg(ids_file), run_dir=tmp_path / "run", record=True, progress=False)
    assert sorted(sub.ids("train")) == sorted(keep)
    for split in ("val", "test"):
        assert sub.ids(split) == full.ids(split)
    assert (sub.pixels("val") == full.pixels("val")).all()
    # a resumed run reads its splits.csv, which lists the subsample only
    again = load_real_data(_cfg(ids_file), run_dir=tmp_path / "run", progress=False)
    assert again.ids("train") == sub.ids("train") and again.ids("test") == full.ids("test")


def test_an_id_outside_train_or_an_emptied_class_is_refused(tmp_path):
    full = load_real_data(_cfg(), progress=False)
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(full.ids("train")[:5] + [full.ids("test")[0]]))
    with pytest.raises(DataError, match="is not a train image"):
        load_real_data(_cfg(bad), progress=False)
    one_class = [i for i, y in zip(full.ids("train"), full.labels("train"), strict=True) if y == 0]
    only0 = tmp_path / "only0.txt"
    only0.write_text("\n".join(one_class))
    with pytest.raises(DataError, match="train_ids"):
        load_real_data(_cfg(only0), progress=False)
    with pytest.raises(DataError, match="not found"):
        load_real_data(_cfg(tmp_path / "missing.txt"), progress=False)
