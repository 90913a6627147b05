"""A generator preset is checked before a run does any work: unknown keys and a backend's missing extra.

The missing modules are simulated (`sys.modules[name] = None` makes `find_spec` and `import` fail);
nothing is uninstalled. The backends are imported first: diffusers decides at its own import which
optional modules exist, from the installed metadata, and would trip over a module hidden later.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.cli_helpers import run_vsi
from vision_si.errors import ConfigError
from vision_si.generators import list_generators
from vision_si.generators.presets import check_preset, load_preset

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"



@pytest.fixture(autouse=True)
def backends_imported():
    assert {"ddpm", "sd-img2img"} <= set(list_generators())


def test_sd_preset_without_transformers_names_the_module_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match=r"'sd-img2img' \(backend sd-img2img\) needs transformers, which is not "
                                          r"installed: .*pip install -e '\.\[sd\]'"):
        check_preset(load_preset("sd-img2img"))


def test_lora_needs_peft_only_when_a_lora_is_set(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setitem(sys.modules, "peft", None)
    preset = load_preset("sd-txt2img")
    check_preset({**preset, "lora": None})  # no LoRA: peft is not needed
    with pytest.raises(ConfigError, match=r"needs peft"):
        check_preset({**preset, "lora": "my-lora.safetensors"})


def test_a_key_the_backend_does_not_take_is_refused():
    check_preset(load_preset("tiny"))
    with pytest.raises(ConfigError, match=r"does not take \['colour'\]"):
        check_preset({**load_preset("tiny"), "colour": "red"})


@pytest.mark.parametrize(("module", "setting", "needle", "hint"), [
    ("transformers", "generate.preset=sd-img2img", "needs transformers", "pip install -e '.[sd]'"),
    ("ray", "generate.engine=ray", "generate.engine 'ray' needs ray", "pip install -e '.[ray]'"),
])
def test_a_run_missing_an_extra_stops_before_round_0(module, setting, needle, hint, monkeypatch, capsys, tmp_path):
    """An sd preset without transformers, or the ray engine without ray: refused before any training."""
    monkeypatch.setitem(sys.modules, module, None)
    out = tmp_path / "runs"
    code, err, _ = run_vsi(capsys, "run", TINY, "--quiet", "--set", f"output_dir={out}", "--set", setting)
    assert code == 2
    assert needle in err and hint in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    # nothing trained and no half-written run left behind
    assert not out.exists() or not any(out.iterdir())
