"""The `vsi` command's contract: help lists every command; bad input exits 2 with one clear line."""

import subprocess
import sys

import pytest

VSI = [sys.executable, "-m", "vision_si.cli"]


def run(*args, cwd=None):
    return subprocess.run([*VSI, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_help_lists_the_commands_of_the_design():
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("demo", "run", "resume", "train", "diagnose", "generate", "filter", "gate", "report"):
        assert cmd in out.stdout


def test_version_is_printed_with_exit_0():
    from vision_si import __version__

    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"vision_si {__version__}"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "missing.yaml"], "missing.yaml"),
        (["run", "configs/demo.yaml", "--set", "classifier.stepz=3"], "did you mean 'steps'"),
        (["run", "configs/demo.yaml", "--set", "classifier.steps=abc"], "classifier.steps"),
        (["run", "configs/demo.yaml", "--set", "gate.tolerance=7"], "gate.tolerance"),
        (["run", "configs/demo.yaml", "--set", "generate.mode=exemplr"], "did you mean 'exemplar'"),
        (["resume", "not-a-run-dir"], "not-a-run-dir"),
        (["report", "not-a-run-dir"], "not-a-run-dir"),
    ],
)
def test_bad_input_gives_exit_2_and_one_line_naming_the_culprit(args, needle):
    from vision_si.config import REPO_ROOT

    out = run(*args, cwd=REPO_ROOT)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    assert len(out.stderr.strip().splitlines()) == 1


def test_bad_yaml_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("classifier: [unclosed\n")
    out = run("run", str(bad))
    assert out.returncode == 2
    assert "bad.yaml" in out.stderr and "YAML" in out.stderr
