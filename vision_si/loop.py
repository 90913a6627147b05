"""The closed loop: train, diagnose, generate, filter, gate, repeat; then read `test` once.

Read top to bottom, `Loop.run` is the whole method:

    pretrain  (pretrain.enabled) a self-supervised encoder on train + unlabelled images, never val/test
    round 0   train C_0 on real train → diagnose C_0 (out of fold on train, the selecting half of val)
    round r   generate from the budget → filter (critic = C_0, frozen) → gate (paired sides from
              C_{r-1}, judged on the other half of val) → if accepted: pool grows, the gate's
              candidate model becomes C_r, diagnose C_r
    stop      after `loop.max_rounds`, or after `loop.patience` rejected rounds in a row
    final     C_0 and the final model are evaluated once on `test`, with the last accepted round's
              paired gate models (the pool's own effect); summary.json, report.html

Every stage lives in its own folder of the run directory and is skipped when complete, so
`resume` after a crash continues where the run stopped and reaches the same result (on CPU). A
rejected round (with `loop.on_reject: adapt`) makes the next round reuse the diagnosis with fewer
images at a lower exemplar strength (`stages.generation_requests`).

The pieces: `preflight` (checks before any work), `data.real` (the data and its split),
`invariants` (synthetic data never in val/test, `test` read once), `stages` (one adapter per
stage: typed inputs in, typed result saved), `summary` (summary.json), `report`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from vision_si.config import RunConfig, load_config, save_config
from vision_si.data import write_skipped_csv
from vision_si.data.images import run_channels
from vision_si.data.real import RealData, load_real_data
from vision_si.diagnose import Diagnosis
from vision_si.errors import InputError, RunDirError
from vision_si.filter import FilterResult, read_reviews, reviews_pending
from vision_si.gate import GateDecision
from vision_si.invariants import Invariants, splits_are_real
from vision_si.preflight import check_resources, check_settings, cpu_threads
from vision_si.pretrain import (
    Encoder,
    classifier_start,
    encoder_available,
    load_encoder,
    require_lightly,
    run_pretrain,
)
from vision_si.report import write_report
from vision_si.rundir import (
    EventLog,
    RunLock,
    atomic_write_json,
    environment_info,
    is_complete,
    new_run_dir,
    stage_dir,
)
from vision_si.stages import Pool, Stages, accepted_candidates, generation_requests
from vision_si.summary import write_summary
from vision_si.tracking import track_run


class Loop:
    """One run while it executes: `run()` walks the stages, skipping complete ones."""

    def __init__(self, cfg: RunConfig, run_dir: Path, *, progress: bool = True, echo: Callable[[str], None] = print,
                 until: str | None = None, on_stage: Callable[[str], None] | None = None) -> None:
        self.cfg, self.run_dir, self.progress, self.echo, self.until = cfg, Path(run_dir), progress, echo, until
        self.on_stage = on_stage  # called with the stage's name after each stage completes (tracking)
        self.events = EventLog(self.run_dir)
        self.t0 = time.time()
        self.encoder: Encoder | None = None  # the run's self-supervised encoder, once the pretrain stage is done

    def _stage(self, name: str, fn: Callable[[Path], None], *, keep_partial: bool = False) -> bool:
        """Run `fn(tmp_dir)` unless the stage is complete. Returns False when the run should stop here."""
        if is_complete(self.run_dir, name):
            return True
        start = time.time()
        self.events.write("stage_start", stage=name)
        with stage_dir(self.run_dir, name, keep_partial=keep_partial) as tmp:
            fn(tmp)
        seconds = time.time() - start
        self.events.write("stage_done", stage=name, seconds=seconds)
        self.echo(f"[{time.time() - self.t0:7.1f}s] {name} done in {seconds:.1f}s")
        if self.on_stage is not None:
            self.on_stage(name)
        return not (self.until and name.rsplit("/", 1)[-1] == self.until)

    def prepare(self) -> Stages:
        """Preflight, the data and its split (checked), the run's records; the stage adapters over them."""
        cfg = self.cfg
        check_settings(cfg)
        if cfg.pretrain.enabled:
            require_lightly()  # a missing extra is named before any work
        data = load_real_data(cfg, run_dir=self.run_dir, record=True, progress=self.progress,
                              check_split=splits_are_real)
        check_resources(cfg, len(data.table), run_channels(data.table, cfg.data), self.run_dir)
        guard = Invariants(self.run_dir, data, self.events, cfg.filter.pixel_size)
        if data.table.skipped:  # image files left out (bad, or duplicates), on record with their reason
            write_skipped_csv(self.run_dir / "skipped_images.csv", data.table.skipped)
            self.echo(f"data: {len(data.table.skipped)} image file(s) left out (skipped_images.csv)")
        n = data.counts()
        self.echo(f"data: {cfg.data.source}, {len(data.table)} images, {len(data.classes)} classes "
                  f"(train {n['train']}, val {n['val']}, test {n['test']})")
        return Stages(cfg, data, guard, self.run_dir, progress=self.progress)

    def pretrain_stage(self, st: Stages) -> bool:
        """The self-supervised encoder, before round 0; False when the run stops here (`until`).

        A complete stage whose cache entry was deleted since is redone (the same inputs train the
        same weights). Then `classifier.pretrained` is resolved (`classifier_start`), so every
        classifier of the run, round 0's and the gate's, starts from the same weights file.
        """
        done = self.run_dir / "pretrain"
        if done.is_dir() and not encoder_available(done):
            self.echo("pretrain: the cached encoder of this run is gone; training it again")
            shutil.rmtree(done.with_name("pretrain.tmp"), ignore_errors=True)
            os.replace(done, done.with_name("pretrain.tmp"))

        def body(out: Path) -> None:
            run_pretrain(self.cfg, st.data.table, st.data.splits, channels=st.channels, out_dir=out,
                         train_images=st.data.pixels("train"), progress=self.progress, echo=self.echo)

        if not self._stage("pretrain", body):
            return False
        self.encoder = load_encoder(done, self.cfg.classifier.device)
        start = classifier_start(self.cfg, self.encoder)
        if start != self.cfg.classifier.pretrained:
            self.cfg = dataclasses.replace(self.cfg, classifier=dataclasses.replace(self.cfg.classifier, pretrained=start))
            st.cfg = self.cfg
        st.encoder = self.encoder
        return True

    def refilter_if_reviewed(self, tag: str) -> None:
        """A review written after this round's filter and before its gate (`vsi review`) makes the filter
        run again, so the veto counts; the complete folder is renamed to `.tmp`, which the stage discards."""
        done = self.run_dir / tag / "filter"
        if not done.is_dir() or is_complete(self.run_dir, f"{tag}/gate"):
            return
        pending = reviews_pending(FilterResult.load(done).rows, read_reviews(self.run_dir / "reviews.csv"))
        if pending:
            self.echo(f"{tag}: {len(pending)} review(s) in reviews.csv are newer than the filter; filtering again")
            self.events.write("stage_redo", stage=f"{tag}/filter", reason="reviews.csv", ids=pending)
            shutil.rmtree(done.with_name("filter.tmp"), ignore_errors=True)
            os.replace(done, done.with_name("filter.tmp"))

    def run(self) -> Path:
        cfg, rd = self.cfg, self.run_dir
        self.echo(f"run directory: {rd}")
        st = self.prepare()
        if cfg.pretrain.enabled and not self.pretrain_stage(st):
            return rd
        pool = Pool.empty(st.channels, cfg.data.image_size)

        # round 0: real data only, one model (the gate trains its own paired models)
        if not self._stage("round-00/train", lambda tmp: st.train(pool, cfg.seed, tmp / "seed-0"), keep_partial=True):
            return rd
        current = round0 = st.load_model(rd / "round-00/train/seed-0")
        critic = st.critic(round0)  # trained on real data only, never retrained
        if not self._stage("round-00/diagnose", partial(st.diagnose, current), keep_partial=True):
            return rd
        diag = Diagnosis.load(rd / "round-00/diagnose")

        rejected_in_a_row, accepted_round = 0, None
        synthetic: list[str] = []
        for r in range(1, cfg.loop.max_rounds + 1):
            tag = f"round-{r:02d}"
            requests = generation_requests(diag.budget, cfg.loop, rejected_in_a_row)
            if not requests:
                self.echo(f"{tag}: the diagnosis asks for no images; stopping")
                break
            if not self._stage(f"{tag}/generate", partial(st.generate, requests, f"syn-r{r:02d}", current),
                               keep_partial=True):
                return rd
            _rows, cands = st.candidates(rd / tag / "generate")
            synthetic += cands.ids
            self.refilter_if_reviewed(tag)
            if not self._stage(f"{tag}/filter", partial(st.filter, pool, critic, current, cands)):
                return rd
            fres = FilterResult.load(rd / tag / "filter")
            new = accepted_candidates(cands, fres)
            if not self._stage(f"{tag}/gate", partial(st.gate, pool, current, new, diag, fres.leak_pixel_threshold),
                               keep_partial=True):
                return rd
            decision = GateDecision.load(rd / tag / "gate")
            if decision.accepted and len(new):
                pool.add(new, fres.leak_pixel_threshold)
                current, accepted_round = st.load_model(rd / tag / "gate" / "candidate-0"), r
                if not self._stage(f"{tag}/diagnose", partial(st.diagnose, current), keep_partial=True):
                    return rd
                diag = Diagnosis.load(rd / tag / "diagnose")
                rejected_in_a_row = 0
                self.echo(f"{tag}: gate accepted {len(new)} images ({decision.reason})")
            else:
                rejected_in_a_row += 1
                self.echo(f"{tag}: gate {decision.decision} ({decision.reason})")
                if rejected_in_a_row >= cfg.loop.patience:
                    self.echo(f"stopping: {rejected_in_a_row} rejected round(s) in a row (patience {cfg.loop.patience})")
                    break

        if not self._stage("final", partial(st.final, pool, current, synthetic, accepted_round)):
            return rd
        self.finish(st.data)
        return rd

    def finish(self, data: RealData) -> None:
        write_summary(self.run_dir, self.cfg, data)
        write_report(self.run_dir)
        self.echo(f"[{time.time() - self.t0:7.1f}s] report written: {self.run_dir / 'report.html'}")


def run_loop(cfg: RunConfig, run_dir: Path | None = None, *, progress: bool = True,
             echo: Callable[[str], None] = print, until: str | None = None,
             on_run_dir: Callable[[Path], None] | None = None) -> Path:
    """Start a run (a new directory under `cfg.output_dir` unless `run_dir` is given) and execute it.

    `on_run_dir(path)` is called as soon as the run directory exists (the CLI names it when Ctrl-C
    stops the run).
    """
    created = run_dir is None or not Path(run_dir).exists()
    run_dir = Path(new_run_dir(cfg.output_dir, cfg.name) if run_dir is None else run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if on_run_dir is not None:
        on_run_dir(run_dir)
    try:
        with RunLock(run_dir):
            if not (run_dir / "config.yaml").exists():
                _write_run_records(cfg, run_dir)
            with cpu_threads(cfg.threads), track_run(cfg, run_dir) as on_stage:  # on_stage: None unless tracking
                return Loop(cfg, run_dir, progress=progress, echo=echo, until=until, on_stage=on_stage).run()
    except InputError:
        # Bad input found while setting up a new run (data, checkpoints, resources): no stage is
        # complete, so the directory holds nothing worth keeping and is removed, not left half-written.
        if created and not _has_complete_stage(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
            echo(f"run directory {run_dir} removed: the run stopped before its first stage was complete")
        raise


def _write_run_records(cfg: RunConfig, run_dir: Path) -> None:
    """config.yaml (resolved) and env.json of a new run."""
    import torch

    from vision_si import __version__
    from vision_si.devices import resolve_device

    env = environment_info(cfg.seed, str(resolve_device(cfg.classifier.device)), __version__)
    # CPU results are reproducible for a seed at a given thread count (float summation order)
    env["cpu_threads"] = cfg.threads or torch.get_num_threads()
    save_config(cfg, run_dir / "config.yaml")
    atomic_write_json(run_dir / "env.json", env)


def _has_complete_stage(run_dir: Path) -> bool:
    return (run_dir / "final").is_dir() or (run_dir / "pretrain").is_dir() or any(p.is_dir() for p in run_dir.glob("round-*/*") if p.suffix != ".tmp")


def resume(run_dir: Path, *, progress: bool = True, echo: Callable[[str], None] = print,
           until: str | None = None, on_run_dir: Callable[[Path], None] | None = None) -> Path:
    """Continue a run from its last complete stage, with the configuration it was started with."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"'{run_dir}' is not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    return run_loop(cfg, run_dir, progress=progress, echo=echo, until=until, on_run_dir=on_run_dir)

