"""A wheel carries configs/, data/ cards and generators/ presets, and an installed copy finds them.

The YAML folders live once, at the repository root; pyproject.toml maps them into the wheel as
`vision_si/_shipped/...`. Resolution looks in the working directory, the checkout, then that copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import vision_si.config as config_module
import vision_si.generators.presets as presets_module
from vision_si.config import REPO_ROOT, load_config, resolve_path
from vision_si.errors import ConfigError

SHIPPED_FOLDERS = ("configs", "data", "generators")


def _shipped_yaml() -> list[str]:
    """Every YAML file the wheel must carry, as its path inside the wheel."""
    return sorted(f"vision_si/_shipped/{folder}/{p.name}"
                  for folder in SHIPPED_FOLDERS for p in (REPO_ROOT / folder).glob("*.yaml"))


def _source_packages() -> set[str]:
    return {".".join(init.parent.relative_to(REPO_ROOT).parts)
            for init in (REPO_ROOT / "vision_si").rglob("__init__.py") if "__pycache__" not in init.parts}


def test_pyproject_lists_every_package_and_maps_every_yaml_folder():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    tool = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = {f"vision_si._shipped.{folder}" for folder in SHIPPED_FOLDERS}
    # `packages` is a list (find cannot add mapped packages), so a new subpackage must be added by hand
    assert set(tool["packages"]) == _source_packages() | shipped
    assert {pkg: tool["package-dir"][pkg] for pkg in shipped} == {f"vision_si._shipped.{f}": f for f in SHIPPED_FOLDERS}
    assert all(tool["package-data"][pkg] == ["*.yaml"] for pkg in shipped)
    assert len(_shipped_yaml()) >= 5  # demo config, the elpv card, the quick preset at least


@pytest.fixture
def layouts(tmp_path, monkeypatch):
    """A checkout and an installed copy in tmp, each holding `data/<where>.yaml` and a shared card."""
    repo, shipped, cwd = tmp_path / "repo", tmp_path / "site" / "vision_si" / "_shipped", tmp_path / "cwd"
    for root, where in ((repo, "repo"), (shipped, "shipped"), (cwd, "cwd")):
        (root / "data").mkdir(parents=True)
        (root / "data" / f"{where}.yaml").write_text(f"data: {{source: digits}}\nabout: {{name: {where}}}\n")
        (root / "data" / "card.yaml").write_text(f"data: {{source: digits}}\nabout: {{name: {where}}}\n")
    monkeypatch.setattr(config_module, "REPO_ROOT", repo)
    monkeypatch.setattr(config_module, "SHIPPED_ROOT", shipped)
    monkeypatch.chdir(cwd)
    return repo, shipped, cwd


def test_resolve_path_order_is_absolute_cwd_checkout_then_installed_copy(layouts):
    repo, shipped, cwd = layouts
    assert resolve_path("data/card.yaml") == Path("data/card.yaml")  # the working directory wins
    assert resolve_path("data/repo.yaml") == repo / "data/repo.yaml"
    assert resolve_path("data/shipped.yaml") == shipped / "data/shipped.yaml"
    (repo / "data" / "shipped.yaml").write_text("data: {}\n")
    assert resolve_path("data/shipped.yaml") == repo / "data/shipped.yaml"  # the checkout before the copy
    absolute = shipped / "data" / "repo.yaml"
    assert resolve_path(absolute) == absolute
    assert resolve_path("data/nowhere.yaml") == Path("data/nowhere.yaml")


def test_a_card_found_only_in_the_installed_copy_loads_and_a_missing_one_is_named(layouts, tmp_path):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("data: {card: data/shipped.yaml}\n")
    assert load_config(run_yaml).data.source == "digits"
    run_yaml.write_text("data: {card: data/missing-card.yaml}\n")
    with pytest.raises(ConfigError, match="missing-card.yaml"):
        load_config(run_yaml)


def test_preset_dir_is_the_checkouts_and_else_the_installed_copy(tmp_path, monkeypatch):
    repo, shipped = tmp_path / "site-packages", tmp_path / "site-packages" / "vision_si" / "_shipped"
    (repo / "generators").mkdir(parents=True)  # another distribution's folder: not a checkout
    monkeypatch.setattr(presets_module, "REPO_ROOT", repo)
    monkeypatch.setattr(presets_module, "SHIPPED_ROOT", shipped)
    assert presets_module._preset_dir() == shipped / "generators"
    (repo / "pyproject.toml").write_text("")
    assert presets_module._preset_dir() == repo / "generators"


def test_in_this_checkout_everything_resolves_to_the_repository():
    assert resolve_path("configs/demo.yaml").resolve() in {REPO_ROOT / "configs/demo.yaml", Path.cwd() / "configs/demo.yaml"}
    assert presets_module.PRESET_DIR == REPO_ROOT / "generators"


# Run inside the installed copy, from a folder with no YAML: what `vsi demo` resolves before training.
_PROBE = """
import json, sys
from pathlib import Path
import vision_si, vision_si.cli as cli
from vision_si.config import REPO_ROOT, SHIPPED_ROOT, load_config, resolve_path
from vision_si.errors import ConfigError
from vision_si.generators.presets import PRESET_DIR, list_presets, resolve_preset
cfg = cli._load(Path(cli.DEMO_CONFIG), ["output_dir=/nonexistent", "classifier.steps=5", "classifier.warmup_steps=0"])
errors = []
for text in ("data: {card: data/no-such-card.yaml}", "generate: {preset: no-such-preset}"):
    Path("bad.yaml").write_text(text)
    try:
        load_config("bad.yaml") if "card" in text else resolve_preset(load_config("bad.yaml").generate)
    except ConfigError as exc:
        errors.append(str(exc))
print(json.dumps({
    "package": vision_si.__file__, "repo_root": str(REPO_ROOT), "shipped_root": str(SHIPPED_ROOT),
    "demo": str(resolve_path(cli.DEMO_CONFIG)), "card": str(resolve_path(cfg.data.card)),
    "source": cfg.data.source, "channels": cfg.data.channels, "steps": cfg.classifier.steps,
    "preset": resolve_preset(cfg.generate)["name"], "preset_dir": str(PRESET_DIR),
    "presets": list_presets(), "errors": errors,
}))
"""


@pytest.mark.slow
def test_a_built_wheel_carries_the_yaml_and_its_installed_copy_resolves_them(tmp_path):
    # Build from a copy of the packaging inputs: an in-tree build would write build/ into the checkout.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO_ROOT / "vision_si", src / "vision_si", ignore=ignore)
    for folder in SHIPPED_FOLDERS:  # top-level files only: data/ may hold git-ignored caches
        (src / folder).mkdir()
        for f in (REPO_ROOT / folder).iterdir():
            if f.is_file():
                shutil.copy2(f, src / folder / f.name)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, src / name)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1"}
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, env=env, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("vision_si-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(_shipped_yaml()) <= names
    assert {f"{pkg.replace('.', '/')}/__init__.py" for pkg in _source_packages()} <= names
    assert not any(n.startswith(("configs/", "data/", "generators/")) for n in names)  # nothing top-level
    page = {f"vision_si/review_page/{p.name}" for p in (REPO_ROOT / "vision_si" / "review_page").iterdir()}
    assert page and page <= names  # the files `vsi review` serves

    target, cwd = tmp_path / "installed", tmp_path / "elsewhere"
    cwd.mkdir()
    subprocess.run([*pip, "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, env=env, timeout=300)
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=cwd, capture_output=True, text=True, timeout=120,
                         env={**env, "PYTHONPATH": str(target)})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    shipped = target / "vision_si" / "_shipped"
    assert Path(got["package"]).parent == target / "vision_si"  # the installed copy, not this checkout
    assert not (Path(got["repo_root"]) / "configs").exists()  # no checkout to fall back on
    assert got["demo"] == str(shipped / "configs" / "demo.yaml")
    assert got["card"] == str(shipped / "data" / "elpv.yaml")
    # the card's defaults reached the config, and --set style overrides still apply on top
    assert (got["source"], got["channels"], got["steps"]) == ("elpv", 1, 5)
    assert got["preset"] == "quick" and got["preset_dir"] == str(shipped / "generators")
    assert got["presets"] == sorted(p.stem for p in (REPO_ROOT / "generators").glob("*.yaml"))
    card_error, preset_error = got["errors"]
    assert "no-such-card.yaml" in card_error and "not found" in card_error
    assert "no-such-preset" in preset_error and "quick" in preset_error
