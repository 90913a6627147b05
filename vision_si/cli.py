"""The `vsi` command: the whole loop (`demo`, `run`, `resume`) and one command per stage."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from vision_si.errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="vision_si: targeted synthetic data for data-scarce image classification.")


def _not_built(stage: str) -> None:
    typer.echo(f"vsi {stage}: this stage is not built yet", err=True)
    raise typer.Exit(2)


SetOpt = typer.Option(None, "--set", help="Override a config key, e.g. --set classifier.steps=200 (repeatable).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="Only the final table and errors.")


@app.command()
def demo(quiet: bool = QuietOpt, overrides: Optional[list[str]] = SetOpt) -> None:  # noqa: UP007
    """Run the whole loop on the embedded ELPV dataset with the quick CPU profile."""
    _not_built("demo")


@app.command()
def run(config: Path = typer.Argument(..., help="Run config YAML."), quiet: bool = QuietOpt,
        overrides: Optional[list[str]] = SetOpt) -> None:  # noqa: UP007
    """Run the loop from a config file."""
    _not_built("run")


@app.command()
def resume(run_dir: Path = typer.Argument(..., help="Run directory to continue."), quiet: bool = QuietOpt) -> None:
    """Continue an interrupted run from its last complete stage."""
    _not_built("resume")


@app.command()
def train(run_dir: Path = typer.Argument(...)) -> None:
    """Train the round's classifier in a run directory."""
    _not_built("train")


@app.command()
def diagnose(run_dir: Path = typer.Argument(...)) -> None:
    """Diagnose the round's classifier: metrics with intervals, weak slices, budget."""
    _not_built("diagnose")


@app.command()
def generate(run_dir: Path = typer.Argument(...)) -> None:
    """Generate synthetic images for a budget or plan file."""
    _not_built("generate")


@app.command(name="filter")
def filter_(run_dir: Path = typer.Argument(...)) -> None:
    """Score and filter a round's candidates."""
    _not_built("filter")


@app.command()
def gate(run_dir: Path = typer.Argument(...)) -> None:
    """Retrain with the filtered pool and decide on real val."""
    _not_built("gate")


@app.command()
def report(run_dir: Path = typer.Argument(...)) -> None:
    """Write report.html for a run directory."""
    _not_built("report")


def main() -> None:
    try:
        app(standalone_mode=False)
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted; `vsi resume RUN_DIR` continues from the last complete stage", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own exit code
        code = getattr(exc, "exit_code", None)
        if code is not None and hasattr(exc, "show"):
            exc.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
