"""Config: YAML round trip, dataset cards, `--set` overrides, and errors that name the key."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from vision_si.config import (
    REPO_ROOT,
    RunConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from vision_si.errors import ConfigError


def test_saved_config_reloads_to_an_equal_object(tmp_path):
    cfg = RunConfig(name="trip", seed=7)
    cfg.data.source = "csv"
    cfg.data.csv = "labels.csv"
    cfg.data.channels = 3
    cfg.data.split.group_by = "patient"
    cfg.classifier.model_kwargs = {"drop_rate": 0.1}
    cfg.classifier.lr = 1e-4
    cfg.filter.enabled = ["fidelity", "duplicate"]
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    save_config(again, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_bytes() == (tmp_path / "config.yaml").read_bytes()


def test_defaults_round_trip_through_a_plain_dict():
    assert config_from_dict(config_to_dict(RunConfig())) == RunConfig()


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"classifier": {"stepz": 3}}, "unknown key 'classifier.stepz'; did you mean 'steps'"),
        ({"data": {"augmnt": "light"}}, "did you mean 'augment'"),
        ({"daat": {}}, "did you mean 'data'"),
        ({"data": {"split": {"test_fracton": 0.2}}}, "did you mean 'test_fraction'"),
        ({"classifier": {"steps": "many"}}, "classifier.steps: expected an integer, got 'many'"),
        ({"classifier": {"ema": "yes"}}, "classifier.ema: expected true or false"),
        ({"data": {"resize": "crop"}}, "data.resize: 'crop' is not one of"),
        ({"data": {"image_size": 4}}, "data.image_size: 4 is out of range"),
        ({"data": {"channels": 2}}, "data.channels: 2 is out of range"),
        ({"data": {"split": {"test_fraction": 0.95}}}, "data.split.test_fraction: 0.95 is out of range"),
        ({"data": {"max_per_class": 1}}, "data.max_per_class"),
    ],
)
def test_bad_configs_name_the_key(data, needle):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert needle in str(info.value)


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "data": {"source": "digits"}}))
    cfg = load_config(path, ["classifier.lr=0.01", "classifier.steps=120", "data.channels=null",
                             "data.split.group_by=patient", "gate.enabled=false"])
    assert cfg.classifier.lr == 0.01 and isinstance(cfg.classifier.steps, int) and cfg.classifier.steps == 120
    assert cfg.data.channels is None and cfg.data.split.group_by == "patient" and cfg.gate.enabled is False
    assert cfg.data.source == "digits"  # the file's value survives overrides of other keys
    with pytest.raises(ConfigError, match="classifier.steps: expected an integer, got 1.5"):
        load_config(path, ["classifier.steps=1.5"])
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        load_config(path, ["classifier.batchsize=8"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(path, ["classifier.steps"])


def test_dataset_cards_merge_under_the_run_config(tmp_path):
    card = tmp_path / "card.yaml"
    card.write_text(yaml.safe_dump({
        "data": {"source": "imagefolder", "root": "/data/x", "image_size": 64, "augment": "light"},
        "about": {"name": "x", "licence": "CC BY 4.0", "classes": {"a": "first"}},
    }))
    cfg = config_from_dict({"data": {"card": str(card), "image_size": 32}})
    assert cfg.data.source == "imagefolder" and cfg.data.root == "/data/x" and cfg.data.augment == "light"
    assert cfg.data.image_size == 32  # the run config wins over the card

    card.write_text(yaml.safe_dump({"data": {"sorce": "csv"}}))
    with pytest.raises(ConfigError, match="did you mean 'source'"):
        config_from_dict({"data": {"card": str(card)}})
    with pytest.raises(ConfigError, match="data.card.*nowhere.yaml"):
        config_from_dict({"data": {"card": str(tmp_path / "nowhere.yaml")}})


@pytest.mark.parametrize(("card", "source"), [("data/elpv.yaml", "elpv"), ("data/digits.yaml", "digits")])
def test_shipped_cards_load_and_document_the_data(card, source):
    cfg = config_from_dict({"data": {"card": card}})
    assert cfg.data.source == source and cfg.data.channels == 1
    about = yaml.safe_load((REPO_ROOT / card).read_text())["about"]
    assert about["licence"] and about["citation"] and about["classes"]


def test_elpv_card_names_its_licence_and_classes():
    about = yaml.safe_load((REPO_ROOT / "data/elpv.yaml").read_text())["about"]
    assert "CC BY-NC-SA 4.0" in about["licence"]
    assert list(about["classes"]) == ["functional", "possibly_defective", "likely_defective", "defective"]
    assert any("Deitsch" in c for c in about["citation"]) and any("Buerhop-Lutz" in c for c in about["citation"])


def test_every_section_is_a_dataclass_with_defaults():
    for f in dataclasses.fields(RunConfig):
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def test_load_config_finds_a_relative_path_as_the_cli_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository root: the checkout's configs/ is found anyway
    cfg = load_config("configs/demo.yaml", ["classifier.steps=200"])
    assert cfg.name == "demo" and cfg.classifier.steps == 200
    assert cfg == load_config(REPO_ROOT / "configs" / "demo.yaml", ["classifier.steps=200"])
    # a file of that name in the working directory comes first
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("name: mine\n")
    assert load_config("configs/demo.yaml").name == "mine"
    with pytest.raises(ConfigError, match=r"config file 'configs/nope.yaml' not found"):
        load_config("configs/nope.yaml")
