"""The `vsi` command: the whole loop (`demo`, `run`, `resume`) and one command per stage.

Exit codes: 0 success; 2 bad input or configuration (one line naming the file, key or value);
3 an evaluation invariant was violated (synthetic data in val/test, or the run's splits.csv edited); 130 interrupted; 1 a bug,
with the traceback written to a file whose path is printed.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from vision_si.errors import EvaluationInvariantError, InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="vision_si: targeted synthetic data for data-scarce image classification.")


@dataclass
class Session:
    """What `main` must know when a command stops: the run directory a run is working in (for Ctrl-C).

    `main` makes one per invocation and hands it to the command as `ctx.obj`; no module state."""

    run_dir: Path | None = None

    def seen(self, run_dir: Path) -> None:
        self.run_dir = run_dir


def _session(ctx: typer.Context) -> Session:
    return ctx.obj if isinstance(ctx.obj, Session) else Session()


def _show_version(value: bool) -> None:
    if value:
        from vision_si import __version__

        typer.echo(f"vision_si {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                          help="Print the version and exit.")) -> None:
    """vision_si: targeted synthetic data for data-scarce image classification."""


SetOpt = typer.Option(None, "--set", help="Override a config key, e.g. --set classifier.steps=200 (repeatable).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars or stage lines; only the result.")
DEMO_CONFIG = "configs/demo.yaml"  # via resolve_path: working dir, checkout, then the copy a wheel installs
_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def _echo(quiet: bool):
    if quiet:
        # a skipped bad image is recorded in the run's skipped_images.csv; --quiet prints only the result
        warnings.filterwarnings("ignore", message="skipped: ")
        return lambda _msg: None
    return lambda msg: typer.echo(msg, err=True)


def _one_line_warning(message: Warning | str, category: type[Warning], *_args: object, **_kw: object) -> str:
    """Warnings as one line for a command-line user, without the source line that raised them."""
    return f"warning: {message}\n"


def _load(config: Path, overrides: list[str] | None):
    from vision_si.config import load_config, resolve_path

    return load_config(resolve_path(config), overrides or [])


def _print_result(run_dir: Path) -> None:
    """The short table of a finished run: baseline vs final on test, and the gate's rounds."""
    from rich.console import Console
    from rich.table import Table

    from vision_si.rundir import read_json

    summary = read_json(run_dir / "summary.json")
    base, final = summary["test"]["baseline"], summary["test"]["final"]
    table = Table(title=f"test split ({summary['dataset']['splits']['test']} real images, read once)")
    table.add_column("metric")
    table.add_column("baseline (round 0)", justify="right")
    table.add_column("final", justify="right")
    table.add_column("change", justify="right")
    rows = [("macro-F1", base["macro_f1"], final["macro_f1"]),
            ("balanced accuracy", base["balanced_accuracy"], final["balanced_accuracy"]),
            ("accuracy", base["accuracy"], final["accuracy"])]
    rows += [(f"recall {c}", base["per_class"][c]["recall"], final["per_class"][c]["recall"])
             for c in summary["classes"]]
    for name, b, f in rows:
        table.add_row(name, f"{b:.3f}", f"{f:.3f}", f"{f - b:+.3f}")
    console = Console()
    console.print(table)
    decisions = [r.get("gate", {}).get("decision", "n/a") for r in summary["rounds"]]
    accepted = sum(d == "accepted" for d in decisions)
    skipped = sum(d == "skipped" for d in decisions)
    console.print(f"rounds: {len(decisions)} run, {accepted} accepted by the gate, "
                  f"{len(decisions) - accepted - skipped} rejected"
                  + (f", {skipped} skipped (no candidate passed the filter)" if skipped else "")
                  + f"; synthetic images in val/test: {summary['synthetic_in_eval_splits']}")
    for r in summary["rounds"]:
        g = r.get("gate", {})
        d = g.get("delta", {})
        console.print(f"  round {r['round']}: generated {r['generated']}, passed filter "
                      f"{r.get('accepted_by_filter', 0)}, gate {g.get('decision', 'n/a')}"
                      + (f" ({g.get('metric')} change on the judging val images {d['value']:+.3f} "
                         f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}], {g.get('seeds')} paired seeds)"
                         if d and d.get("ci") and g.get("decision") != "skipped" else ""))
    effect = summary["test"].get("synthetic_effect")
    if effect:
        for metric, e in effect.items():
            if isinstance(e, dict):
                console.print(f"the accepted pool's own effect on test ({metric}, round {effect['round']}'s paired "
                              f"models, {effect['seeds']} seeds): {e['delta']:+.3f} [{e['ci'][0]:+.3f}, "
                              f"{e['ci'][1]:+.3f}]")
    if accepted == 0:
        console.print("the gate accepted no synthetic images: the final model is the round-0 model")
    console.print(f"report: {run_dir / 'report.html'}")


def _finish(run_dir: Path) -> None:
    if (run_dir / "summary.json").exists():
        _print_result(run_dir)
    else:
        typer.echo(f"run directory: {run_dir} (stopped before the end; `vsi resume {run_dir}` continues)")


@app.command()
def demo(ctx: typer.Context, quiet: bool = QuietOpt, overrides: Optional[list[str]] = SetOpt,  # noqa: UP045
         output_dir: Path = typer.Option(Path("runs"), help="Where the run directory is created.")) -> None:
    """Run the whole loop on the embedded ELPV dataset with the quick CPU profile (about 4 min on 2 idle cores)."""
    cfg = _load(Path(DEMO_CONFIG), [f"output_dir={output_dir}", *(overrides or [])])
    from vision_si.loop import run_loop

    _finish(run_loop(cfg, progress=not quiet, echo=_echo(quiet), on_run_dir=_session(ctx).seen))


@app.command()
def run(ctx: typer.Context, config: Path = typer.Argument(..., help="Run config YAML (see configs/)."),
        quiet: bool = QuietOpt, overrides: Optional[list[str]] = SetOpt) -> None:  # noqa: UP045
    """Run the loop from a config file."""
    cfg = _load(config, overrides)
    from vision_si.loop import run_loop

    _finish(run_loop(cfg, progress=not quiet, echo=_echo(quiet), on_run_dir=_session(ctx).seen))


@app.command()
def resume(ctx: typer.Context, run_dir: Path = typer.Argument(..., help="Run directory to continue."),
           quiet: bool = QuietOpt) -> None:
    """Continue an interrupted run from its last complete stage."""
    _require_run_dir(run_dir)
    from vision_si.loop import resume as resume_run

    _finish(resume_run(run_dir, progress=not quiet, echo=_echo(quiet), on_run_dir=_session(ctx).seen))


def _require_run_dir(run_dir: Path) -> None:
    if not (run_dir / "config.yaml").is_file():
        raise InputError(f"'{run_dir}' is not a run directory (no config.yaml)")


def _until(ctx: typer.Context, stage: str, target: Path, overrides: list[str] | None, quiet: bool) -> None:
    """Run a config (new run) or a run directory up to and including the next `stage`."""
    seen = _session(ctx).seen
    if target.is_dir():
        _require_run_dir(target)
        from vision_si.loop import resume as resume_run

        if overrides:
            raise InputError("--set applies to a new run from a config file, not to an existing run directory")
        rd = resume_run(target, progress=not quiet, echo=_echo(quiet), until=stage, on_run_dir=seen)
    else:
        cfg = _load(target, overrides)
        from vision_si.loop import run_loop

        rd = run_loop(cfg, progress=not quiet, echo=_echo(quiet), until=stage, on_run_dir=seen)
    if (rd / "summary.json").exists():  # no such stage was left: the run went on to its end
        typer.echo(f"no '{stage}' stage was left to run: the run is complete", err=True)
        _print_result(rd)
    else:
        typer.echo(f"run directory: {rd}")


TargetArg = typer.Argument(..., help="A run config YAML (starts a new run) or a run directory (continues it).")


@app.command()
def pretrain(target: Path = TargetArg, quiet: bool = QuietOpt, overrides: Optional[list[str]] = SetOpt) -> None:  # noqa: UP045
    """Train (or load from its cache) the run's self-supervised encoder and print where it is."""
    from vision_si.pretrain import load_encoder, require_lightly

    if target.is_dir():
        _require_run_dir(target)
        if overrides:
            raise InputError("--set applies to a new run from a config file, not to an existing run directory")
        from vision_si.config import load_config
        from vision_si.loop import resume as resume_run
        from vision_si.pretrain import encoder_available

        if not load_config(target / "config.yaml").pretrain.enabled:
            raise InputError(f"{target}: the run was started without pretraining (pretrain.enabled: false); "
                             "`vsi pretrain CONFIG` starts a new run with it")
        require_lightly()
        rd = target
        if not encoder_available(target / "pretrain"):  # a complete stage is only read, never run past
            rd = resume_run(target, progress=not quiet, echo=_echo(quiet), until="pretrain")
    else:
        cfg = _load(target, [*(overrides or []), "pretrain.enabled=true"])  # this command always pretrains
        require_lightly()
        from vision_si.loop import run_loop

        rd = run_loop(cfg, progress=not quiet, echo=_echo(quiet), until="pretrain")
    enc = load_encoder(rd / "pretrain", "cpu")
    typer.echo(f"encoder: {enc.path} ({enc.meta['arch']}, {enc.meta['method']}, {enc.meta['n_inputs']} images, "
               f"{enc.dim}-d embeddings)")
    typer.echo(f"run directory: {rd}")


def _stage_command(stage: str, doc: str) -> None:
    """Register `vsi STAGE TARGET`: a new run (a config) or a run directory, up to the next `stage`."""

    def command(ctx: typer.Context, target: Path = TargetArg, quiet: bool = QuietOpt,
                overrides: Optional[list[str]] = SetOpt) -> None:  # noqa: UP045
        _until(ctx, stage, target, overrides, quiet)

    command.__doc__ = doc
    app.command(name=stage)(command)


_stage_command("train", "Run up to the next training stage (round 0: the classifier on real data).")
_stage_command("diagnose", "Run up to the next diagnosis: metrics with intervals, weak slices, budget and plots.")


@app.command()
def generate(ctx: typer.Context,
             target: Path = typer.Argument(None, help="A run config or run directory (omit with --plan)."),
             plan: Path = typer.Option(None, help="A plan file for a batch job outside the loop."),
             out: Path = typer.Option(None, help="Output folder of a --plan job."),
             engine: str = typer.Option("local", help="local or ray."),
             address: str = typer.Option(None, help="Ray cluster address to join (with --engine ray)."),
             quiet: bool = QuietOpt, overrides: Optional[list[str]] = SetOpt) -> None:  # noqa: UP045
    """Generate the next round's images, or run a plan file as a resumable batch job (--plan)."""
    if plan is not None:
        from vision_si.generators.plan import generate_from_plan

        if out is None:
            raise InputError("--plan needs --out DIR: where the images and manifest.jsonl go")
        if engine not in ("local", "ray"):
            raise InputError(f"--engine {engine!r} is not one of local, ray")
        result = generate_from_plan(plan, out, engine=engine, address=address, progress=not quiet)
        typer.echo(f"{len(result.rows)} images in {out} (manifest: {result.manifest_path})")
        return
    if target is None:
        raise InputError("give a run config or run directory, or --plan PLAN --out DIR")
    _until(ctx, "generate", target, overrides, quiet)


_stage_command("filter", "Run up to the next filtering stage: score every candidate and decide with a reason.")
_stage_command("gate", "Run up to the next gate: retrain with the filtered pool and decide on real val.")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="Run directory.")) -> None:
    """Write report.html for a run directory (complete or not)."""
    _require_run_dir(run_dir)
    from vision_si.report import write_report
    from vision_si.rundir import check_splits_record

    check_splits_record(run_dir)  # a report of an edited split would misstate what test was (exit 3)

    typer.echo(str(write_report(run_dir)))


@app.command()
def review(run_dir: Path = typer.Argument(..., help="Run directory."),
           host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback lets others on the "
                                                      "network mark images."),
           port: int = typer.Option(0, help="Port to listen on; 0 picks a free one.")) -> None:
    """Serve a page to review a run's synthetic images and veto them (writes reviews.csv); prints its address."""
    _require_run_dir(run_dir)
    from vision_si.review import serve_review

    serve_review(run_dir, host=host, port=port, echo=lambda msg: typer.echo(msg))


def _interrupted(session: Session) -> None:
    run_dir = session.run_dir
    hint = f"`vsi resume {run_dir}`" if run_dir else "`vsi resume RUN_DIR`"
    typer.echo(f"interrupted; {hint} continues from the last complete stage", err=True)
    sys.exit(130)


def main() -> None:
    warnings.formatwarning = _one_line_warning
    session = Session()
    try:
        # Outside standalone mode typer turns Ctrl-C into a returned 130 and `typer.Exit(n)` into a
        # returned n (commands themselves return None), so the return value is the exit code.
        code = app(standalone_mode=False, obj=session)
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except EvaluationInvariantError as exc:
        typer.echo(f"stopped: {exc}", err=True)
        sys.exit(3)
    except (typer.Abort, KeyboardInterrupt):
        _interrupted(session)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        if hasattr(exc, "exit_code") and hasattr(exc, "show"):  # click's usage errors
            exc.show()
            sys.exit(2)
        if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS:
            # a full disk or an unwritable folder: the user's to fix; stage folders are renamed only
            # when complete, so what was complete stays intact
            where = f" '{exc.filename}'" if exc.filename else ""
            typer.echo(f"error: {exc.strerror}{where}; complete stages are intact, `vsi resume` continues "
                       "once this is fixed", err=True)
            sys.exit(2)
        fd, path = tempfile.mkstemp(prefix="vsi-error-", suffix=".txt")
        with os.fdopen(fd, "w") as fh:
            traceback.print_exc(file=fh)
        typer.echo(f"internal error: {type(exc).__name__}: {exc} (traceback: {path})", err=True)
        sys.exit(1)
    if code == 130:
        _interrupted(session)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
