"""Run the real `vsi` entry point in-process, as the reliability tests do."""

from __future__ import annotations

import sys

from vision_si import cli


def run_vsi(capsys, *args) -> tuple[int, str, str]:
    """`vsi ARGS` through `cli.main`, exactly as the console script calls it; returns (exit code, stderr, stdout)."""
    capsys.readouterr()
    old, sys.argv = sys.argv, ["vsi", *map(str, args)]
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def vsi(capsys, *args) -> tuple[int, str]:
    """`vsi ARGS` in-process; returns (exit code, stderr) and fails on any traceback."""
    code, err, _out = run_vsi(capsys, *args)
    assert "Traceback" not in err and "internal error" not in err, err
    return code, err
