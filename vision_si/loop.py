"""The closed loop: train, diagnose, generate, filter, gate, repeat; then read `test` once.

Read top to bottom, `run_loop` is the whole method:

    round 0   train C_0 on real train → diagnose C_0 on real val
    round r   generate from the budget → filter (critic = C_0, frozen) → gate (retrain, paired
              bootstrap on real val) → if accepted: pool grows, C_r replaces C_{r-1}, diagnose C_r
    stop      after `loop.max_rounds`, or after `loop.patience` rejected rounds in a row
    final     C_0 and the final model are evaluated once on `test`; summary.json, report.html

Every stage lives in its own folder of the run directory and is skipped when complete, so
`resume` after a crash continues where the run stopped and reaches the same result (on CPU).
When a round is rejected and `loop.on_reject == "adapt"`, the next round reuses the diagnosis with
half the images and exemplar strength × 0.7 (variations closer to the real exemplars), so it does
not simply repeat what the gate refused.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from vision_si.classifier import TrainedClassifier, load_classifier, predict, train_classifier
from vision_si.config import RunConfig, load_config, save_config
from vision_si.data import (
    build_augmentation,
    load_images,
    load_source,
    make_splits,
    read_splits_csv,
    split_groups,
    write_splits_csv,
)
from vision_si.data.images import load_image_files, run_channels
from vision_si.diagnose import Diagnosis, diagnose
from vision_si.errors import ConfigError, EvaluationInvariantError, InputError, RunDirError
from vision_si.filter import FilterResult, filter_candidates, read_reviews, reviews_pending
from vision_si.gate import GateDecision, run_gate
from vision_si.generators import GenerationRequest
from vision_si.generators.presets import check_preset, resolve_preset
from vision_si.generators.runner import read_manifest, run_generation
from vision_si.metrics import bootstrap_interval, classification_metrics
from vision_si.plots import write_diagnosis_plots
from vision_si.report import write_report
from vision_si.rundir import (
    EventLog,
    RunLock,
    atomic_write_json,
    atomic_write_text,
    environment_info,
    is_complete,
    new_run_dir,
    read_json,
    stage_dir,
)
from vision_si.similarity import max_similarity, pixel_vectors
from vision_si.tracking import track_run

STAGES = ("train", "diagnose", "generate", "filter", "gate", "final")


@dataclass
class RealData:
    """Real images of the run, split once. `test` pixels are loaded only when asked for."""

    cfg: RunConfig
    table: Any
    splits: np.ndarray
    classes: list[str]
    index: dict[str, np.ndarray]
    images: dict[str, np.ndarray] = field(default_factory=dict)

    def labels(self, split: str) -> np.ndarray:
        return self.table.labels[self.index[split]]

    def ids(self, split: str) -> list[str]:
        return [self.table.ids[i] for i in self.index[split]]

    def sha256(self, split: str) -> list[str]:
        return [self.table.sha256[i] for i in self.index[split]]

    def pixels(self, split: str) -> np.ndarray:
        if split not in self.images:
            self.images[split] = load_images(self.table, self.index[split], self.cfg.data)
        return self.images[split]


@dataclass
class Pool:
    """Synthetic images accepted by filter and gate so far: they join `train`, never anything else."""

    ids: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    leak_pixel: list[float] = field(default_factory=list)  # the leak threshold each image passed

    def add(self, ids: list[str], labels: np.ndarray, images: np.ndarray, leak_pixel: float) -> None:
        self.ids += list(ids)
        self.labels += [int(v) for v in labels]
        self.images += list(images)
        self.leak_pixel += [float(leak_pixel)] * len(ids)

    def arrays(self, channels: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.ids:
            return np.zeros((0, channels, size, size), np.float32), np.zeros(0, np.int64)
        return np.stack(self.images).astype(np.float32), np.asarray(self.labels, np.int64)


class Loop:
    """State of one run while it executes; `run()` walks the stages, skipping complete ones."""

    def __init__(self, cfg: RunConfig, run_dir: Path, *, progress: bool = True, echo: Callable[[str], None] = print,
                 until: str | None = None, on_stage: Callable[[str], None] | None = None) -> None:
        self.cfg, self.run_dir, self.progress, self.echo, self.until = cfg, Path(run_dir), progress, echo, until
        self.on_stage = on_stage  # called with the stage's name after each stage completes (tracking)
        self.events = EventLog(self.run_dir)
        self.t0 = time.time()
        self.executed: list[str] = []

    # ------------------------------------------------------------------ stage bookkeeping
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
        self.executed.append(name)
        if self.on_stage is not None:
            self.on_stage(name)
        return not (self.until and name.rsplit("/", 1)[-1] == self.until)

    # ------------------------------------------------------------------ data
    def load_data(self) -> RealData:
        cfg = self.cfg
        try:  # an unknown preset or backend, or a backend's missing extra, is named now, not after round 0
            check_preset(resolve_preset(cfg.generate))
        except ConfigError as exc:
            raise ConfigError(f"generate.preset: {exc}") from None
        if cfg.generate.engine == "ray" and importlib.util.find_spec("ray") is None:
            raise ConfigError("generate.engine 'ray' needs ray, which is not installed: install the `ray` extra "
                              "(`pip install -e '.[ray]'` in a checkout, or `make setup-dev`)")
        table = load_source(cfg.data, cfg.seed, progress=self.progress)
        check_resources(cfg, len(table), run_channels(table, cfg.data), self.run_dir)
        path = self.run_dir / "splits.csv"
        if path.exists():
            self.check_splits_file(path)
            splits = read_splits_csv(path, table)
        else:
            split_seed = cfg.seed if cfg.data.split.seed is None else cfg.data.split.seed
            splits = make_splits(table, cfg.data.split, split_seed)
            write_splits_csv(table, splits, path, groups=split_groups(table, cfg.data.split))
        if table.skipped:  # images dropped by `on_bad_image: skip`, kept on record with their reason
            lines = ["path,reason"] + [f'"{r["path"]}","{r["reason"]}"' for r in table.skipped]
            atomic_write_text(self.run_dir / "skipped_images.csv", "\n".join(lines) + "\n")
            self.echo(f"data: {len(table.skipped)} bad image(s) skipped (skipped_images.csv)")
        index = {s: np.flatnonzero(splits == s) for s in ("train", "val", "test")}
        data = RealData(cfg, table, splits, list(table.classes), index)
        self.channels = int(data.pixels("train").shape[1])
        return data

    # ------------------------------------------------------------------ models
    def _augment(self, seed: int) -> Any:
        return build_augmentation(self.cfg.data.augment, self.channels, seed)

    def train(self, data: RealData, pool: Pool, seed: int, out_dir: Path) -> TrainedClassifier:
        pool_x, pool_y = pool.arrays(self.channels, self.cfg.data.image_size)
        self.check_invariants(data, pool.ids)
        return train_classifier(
            self.cfg.classifier, data.pixels("train"), data.labels("train"), classes=data.classes, seed=seed,
            out_dir=out_dir, val_images=data.pixels("val"), val_labels=data.labels("val"),
            extra_images=pool_x if len(pool_y) else None, extra_labels=pool_y if len(pool_y) else None,
            extra_ids=pool.ids or None, augment=self._augment(seed), progress=self.progress)

    def load_model(self, path: Path, data: RealData) -> TrainedClassifier:
        # a checkpoint swapped in from another run (other arch or class list) is refused, naming the file
        return load_classifier(path, self.cfg.classifier.device, arch=self.cfg.classifier.arch, classes=data.classes)

    def model_seeds(self) -> list[int]:
        return [self.cfg.seed + k for k in range(self.cfg.gate.seeds)]

    def _predict(self, clf: TrainedClassifier, images: np.ndarray):
        return predict(clf, images, batch_size=self.cfg.classifier.predict_batch_size)

    # ------------------------------------------------------------------ invariants
    def check_invariants(self, data: RealData, synthetic_ids: list[str],
                         synthetic_sha256: list[str] | None = None) -> int:
        """Count synthetic images found in `val`/`test` by id or sha256; any is fatal."""
        eval_ids = set(data.ids("val")) | set(data.ids("test"))
        eval_sha = set(data.sha256("val")) | set(data.sha256("test"))
        bad = sum(1 for i in synthetic_ids if i in eval_ids)
        bad += sum(1 for h in (synthetic_sha256 or []) if h in eval_sha)
        if bad:
            raise EvaluationInvariantError(
                f"{bad} synthetic image(s) found in the val/test splits of {self.run_dir}; the run is stopped")
        return bad

    def check_splits_file(self, path: Path) -> None:
        """`splits.csv` lists real images only: a row with a synthetic id or sha256 stops the run."""
        syn_ids, syn_sha = set(), set()
        for manifest in sorted(self.run_dir.glob("round-*/generate*/manifest.jsonl")):
            for line in manifest.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash
                    continue
                syn_ids.add(str(row.get("id")))
                syn_sha.add(str(row.get("sha256")))
        for row in read_splits_csv(path):
            if row["id"] in syn_ids or row["id"].startswith("syn-") or row["sha256"] in syn_sha:
                raise EvaluationInvariantError(
                    f"{path}: row '{row['id']}' (split {row['split']}) is a synthetic image (by id or sha256); "
                    "splits.csv must list real images only; the run is stopped")

    def check_near_copies(self, data: RealData, images: np.ndarray, ids: list[str],
                          thresholds: list[float]) -> None:
        """No synthetic image about to count in an evaluation is a near-copy (pixels) of a val/test image.

        Each image is held to the leak threshold the leakage filter applied to it (fixed, or
        calibrated on the real data), so the check catches what slipped past or was tampered with.
        """
        if not len(images):
            return
        eval_x = np.concatenate([data.pixels("val"), self._test_pixels_for_leak_check(data, "invariant check")])
        size = min(self.cfg.filter.pixel_size, self.cfg.data.image_size)  # as the leakage filter compares
        sims, where = max_similarity(pixel_vectors(images, size), pixel_vectors(eval_x, size))
        limit = np.asarray(thresholds, dtype=np.float64)
        bad = np.flatnonzero(sims >= limit)
        if len(bad):
            eval_ids = data.ids("val") + data.ids("test")
            i = int(bad[0])
            raise EvaluationInvariantError(
                f"synthetic image '{ids[i]}' is a near-copy of evaluation image '{eval_ids[where[i]]}' "
                f"(pixel correlation {sims[i]:.4f} >= the leak threshold {limit[i]:.4f}) "
                f"in {self.run_dir}; the run is stopped")

    # ------------------------------------------------------------------ the loop
    def run(self) -> Path:
        cfg, rd = self.cfg, self.run_dir
        self.echo(f"run directory: {rd}")
        data = self.load_data()
        n = {s: len(v) for s, v in data.index.items()}
        self.echo(f"data: {cfg.data.source}, {len(data.table)} images, {len(data.classes)} classes "
                  f"(train {n['train']}, val {n['val']}, test {n['test']})")
        pool = Pool()
        seeds = self.model_seeds()

        # round 0: real data only
        def train0(tmp: Path) -> None:
            for k, s in enumerate(seeds):
                self.train(data, pool, s, tmp / f"seed-{k}")

        if not self._stage("round-00/train", train0, keep_partial=True):
            return rd
        models = [self.load_model(rd / "round-00/train" / f"seed-{k}", data) for k in range(len(seeds))]
        critic = models[0]  # the frozen critic: trained on real data only, never retrained
        if not self._stage("round-00/diagnose", partial(self.diagnose, data, pool, models[0])):
            return rd
        diag = Diagnosis.load(rd / "round-00/diagnose")

        rejected_in_a_row, adapt = 0, 0
        all_synthetic: list[str] = []
        for r in range(1, cfg.loop.max_rounds + 1):
            tag = f"round-{r:02d}"
            requests = self.requests(diag, adapt)
            if not requests:
                self.echo(f"{tag}: the diagnosis asks for no images; stopping")
                break
            gen_dir = rd / tag / "generate"

            if not self._stage(f"{tag}/generate", partial(self.generate, data, requests, f"syn-r{r:02d}", models[0]),
                               keep_partial=True):
                return rd
            rows = read_manifest(gen_dir / "manifest.jsonl")
            all_synthetic += [row.id for row in rows]
            self.check_invariants(data, [row.id for row in rows], [row.sha256 for row in rows])
            cand_ids = [row.id for row in rows]
            cand_labels = np.asarray([row.class_index for row in rows], np.int64)
            cand_x = load_image_files([gen_dir / row.path for row in rows], cfg.data, channels=self.channels)

            self.refilter_if_reviewed(tag)
            if not self._stage(f"{tag}/filter", partial(self.filter, data, pool, critic, models[0], cand_ids,
                                                        cand_labels, cand_x, rows)):
                return rd
            fres = FilterResult.load(rd / tag / "filter")
            keep = np.isin(cand_ids, list(fres.accepted_ids))
            new_ids = [i for i, k in zip(cand_ids, keep, strict=True) if k]
            leak_pixel = leak_pixel_threshold(fres, cfg.filter.leak_pixel)
            if not self._stage(f"{tag}/gate", partial(self.gate, data, pool, models, new_ids, cand_labels[keep],
                                                      cand_x[keep], diag, leak_pixel), keep_partial=True):
                return rd
            decision = GateDecision.load(rd / tag / "gate")
            if decision.accepted and new_ids:
                pool.add(new_ids, cand_labels[keep], cand_x[keep], leak_pixel)
                models = [self.load_model(rd / tag / "gate" / f"candidate-{k}", data) for k in range(len(seeds))]
                if not self._stage(f"{tag}/diagnose", partial(self.diagnose, data, pool, models[0])):
                    return rd
                diag = Diagnosis.load(rd / tag / "diagnose")
                rejected_in_a_row, adapt = 0, 0
                self.echo(f"{tag}: gate accepted {len(new_ids)} images ({decision.reason})")
            else:
                rejected_in_a_row += 1
                adapt += 1 if cfg.loop.on_reject == "adapt" else 0
                self.echo(f"{tag}: gate rejected ({decision.reason})")
                if rejected_in_a_row >= cfg.loop.patience:
                    self.echo(f"stopping: {rejected_in_a_row} rejected round(s) in a row (patience {cfg.loop.patience})")
                    break

        if not self._stage("final", partial(self.final, data, pool, models[0], all_synthetic)):
            return rd
        self.write_summary(data)
        write_report(rd)
        self.echo(f"[{time.time() - self.t0:7.1f}s] report written: {rd / 'report.html'}")
        return rd

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

    # ------------------------------------------------------------------ stage bodies
    def diagnose(self, data: RealData, pool: Pool, model: TrainedClassifier, out: Path) -> None:
        val = self._predict(model, data.pixels("val"))
        train = self._predict(model, data.pixels("train"))
        diag = diagnose(self.cfg.diagnose, classes=data.classes, val_labels=data.labels("val"), val_probs=val.probs,
                        val_embeddings=val.embeddings, val_ids=data.ids("val"), train_labels=data.labels("train"),
                        train_embeddings=train.embeddings, train_ids=data.ids("train"), seed=self.cfg.seed,
                        mode=self.cfg.generate.mode, strength=self.cfg.generate.strength)
        diag.save(out)
        # exemplar grids show training exemplars and the val images the slice gets wrong
        by_id = dict(zip(data.ids("train"), data.pixels("train"), strict=True))
        by_id.update(zip(data.ids("val"), data.pixels("val"), strict=True))
        write_diagnosis_plots(diag, out, val_embeddings=val.embeddings, val_labels=data.labels("val"),
                              val_probs=val.probs, seed=self.cfg.seed,
                              images_by_id=by_id)

    def generate(self, data: RealData, requests: list[GenerationRequest], id_prefix: str,
                 current: TrainedClassifier, out: Path) -> None:
        # guided mode steers sampling with the gradient of the model being improved (never the critic)
        guide = current.logits if any(q.mode == "guided" for q in requests) else None
        run_generation(self.cfg.generate, requests, train_images=data.pixels("train"),
                       train_labels=data.labels("train"), train_ids=data.ids("train"), classes=data.classes,
                       out_dir=out, seed=self.cfg.seed, id_prefix=id_prefix, classifier_fn=guide,
                       progress=self.progress)

    def requests(self, diag: Diagnosis, adapt: int) -> list[GenerationRequest]:
        out = []
        for a in diag.budget:
            count = int(round(a.count * (0.5**adapt)))
            if count <= 0:
                continue
            mode = self.cfg.generate.mode
            exemplars = list(a.exemplar_ids)
            if mode == "exemplar" and not exemplars:
                mode = "class"
            out.append(GenerationRequest(class_index=a.class_index, class_name=a.class_name, slice_id=a.slice_id,
                                         count=count, exemplar_ids=exemplars, mode=mode,
                                         strength=float(a.strength if a.strength is not None
                                                        else self.cfg.generate.strength) * (0.7**adapt)))
        return out

    def filter(self, data: RealData, pool: Pool, critic: TrainedClassifier, current: TrainedClassifier,
               cand_ids: list[str], cand_labels: np.ndarray, cand_x: np.ndarray, rows: list, out: Path) -> None:
        crit_c = self._predict(critic, cand_x)
        cur_c = self._predict(current, cand_x)
        crit_train = self._predict(critic, data.pixels("train"))
        eval_x = np.concatenate([data.pixels("val"), self._test_pixels_for_leak_check(data)])
        crit_eval = self._predict(critic, eval_x)
        n_val = len(data.index["val"])
        pool_x, _ = pool.arrays(self.channels, self.cfg.data.image_size)
        pool_emb = self._predict(critic, pool_x).embeddings if len(pool_x) else None
        res = filter_candidates(
            self.cfg.filter, candidate_ids=cand_ids, candidate_labels=cand_labels, candidate_images=cand_x,
            candidate_critic_probs=crit_c.probs, candidate_critic_emb=crit_c.embeddings,
            candidate_current_probs=cur_c.probs, real_train_images=data.pixels("train"),
            real_train_labels=data.labels("train"), real_train_emb=crit_train.embeddings, eval_images=eval_x,
            eval_emb=crit_eval.embeddings, eval_sha256=data.sha256("val") + data.sha256("test"),
            candidate_sha256=[row.sha256 for row in rows], pool_images=pool_x if len(pool_x) else None,
            pool_emb=pool_emb, reviews=read_reviews(self.run_dir / "reviews.csv"), seed=self.cfg.seed,
            real_val_critic_probs=crit_eval.probs[:n_val], real_val_labels=data.labels("val"))
        res.save(out)

    def _test_pixels_for_leak_check(self, data: RealData, purpose: str = "leakage check") -> np.ndarray:
        # The leakage filter compares candidates with test *pixels* (never labels, never a model's
        # predictions); this read is recorded apart from the one evaluation of `test`.
        self.events.write("test_pixels_read", purpose=purpose)
        return data.pixels("test")

    def gate(self, data: RealData, pool: Pool, models: list[TrainedClassifier], new_ids: list[str],
             new_labels: np.ndarray, new_x: np.ndarray, diag: Diagnosis, leak_pixel: float, out: Path) -> None:
        val_x = data.pixels("val")
        baseline_preds = np.stack([self._predict(m, val_x).probs.argmax(1) for m in models])
        pool_x, pool_y = pool.arrays(self.channels, self.cfg.data.image_size)
        self.check_invariants(data, pool.ids + new_ids)
        self.check_near_copies(data, np.concatenate([pool_x, new_x]) if len(pool_x) else new_x, pool.ids + new_ids,
                               pool.leak_pixel + [leak_pixel] * len(new_ids))
        weak = sorted({a.class_index for a in diag.budget}) or None
        decision = run_gate(
            self.cfg.gate, self.cfg.classifier, train_images=data.pixels("train"), train_labels=data.labels("train"),
            pool_images=pool_x, pool_labels=pool_y, pool_ids=pool.ids, candidate_images=new_x,
            candidate_labels=new_labels, candidate_ids=new_ids, val_images=val_x, val_labels=data.labels("val"),
            classes=data.classes, seed=self.cfg.seed, out_dir=out, baseline_preds=baseline_preds,
            augment=self._augment, weak_classes=weak, progress=self.progress)
        decision.save(out)

    def final(self, data: RealData, pool: Pool, model: TrainedClassifier, synthetic_ids: list[str], out: Path) -> None:
        self.check_invariants(data, synthetic_ids)
        pool_x, _ = pool.arrays(self.channels, self.cfg.data.image_size)
        self.check_near_copies(data, pool_x, pool.ids, pool.leak_pixel)
        baseline = self.load_model(self.run_dir / "round-00/train/seed-0", data)
        # A kill during this stage may redo the same evaluation (same two checkpoints); evaluating
        # any other model on `test` after it has been read is refused.
        checkpoints = [baseline.checkpoint_sha256, model.checkpoint_sha256]
        earlier = [e for e in self.events.read() if e.get("event") == "test_evaluated"]
        if any(e.get("checkpoints") != checkpoints for e in earlier):
            raise EvaluationInvariantError(f"`test` of {self.run_dir} was already evaluated once, with other models; "
                                           "refusing again")
        if not earlier:
            self.events.write("test_evaluated", models=["baseline", "final"], checkpoints=checkpoints)
        test_x, test_y = data.pixels("test"), data.labels("test")
        result = {"n_images": int(len(test_y)), "synthetic_in_eval_splits": 0}
        for name, clf in (("baseline", baseline), ("final", model)):
            preds = self._predict(clf, test_x).probs.argmax(1)
            m = classification_metrics(test_y, preds, data.classes)
            k = len(data.classes)
            for metric in ("accuracy", "balanced_accuracy", "macro_f1"):
                m[f"{metric}_ci"] = list(bootstrap_interval(test_y, preds, k, metric, seed=self.cfg.seed,
                                                            n_bootstrap=self.cfg.gate.n_bootstrap))
            m["model"] = str(clf.path)
            result[name] = m
        atomic_write_json(out / "test.json", result)

    # ------------------------------------------------------------------ summary
    def write_summary(self, data: RealData) -> dict[str, Any]:
        rd, cfg = self.run_dir, self.cfg
        per_class = {c: {s: int((data.labels(s) == k).sum()) for s in ("train", "val", "test")}
                     for k, c in enumerate(data.classes)}
        rounds = []
        for r in range(1, cfg.loop.max_rounds + 1):
            tag = rd / f"round-{r:02d}"
            if not (tag / "generate").is_dir():
                break
            entry: dict[str, Any] = {"round": r, "generated": len(read_manifest(tag / "generate" / "manifest.jsonl"))}
            if (tag / "filter").is_dir():
                f = FilterResult.load(tag / "filter")
                entry["accepted_by_filter"] = len(f.accepted_ids)
                entry["rejected_by_filter"] = f.rejected_counts()
            if (tag / "gate").is_dir():
                entry["gate"] = GateDecision.load(tag / "gate").summary()
            rounds.append(entry)
        test = read_json(rd / "final" / "test.json")
        keys = ("accuracy", "balanced_accuracy", "macro_f1", "accuracy_ci", "balanced_accuracy_ci", "macro_f1_ci",
                "per_class", "confusion")
        summary = {
            "dataset": {"name": cfg.data.source, "n_images": len(data.table), "skipped_images": len(data.table.skipped),
                        "splits": {s: int(len(v)) for s, v in data.index.items()}, "per_class": per_class},
            "classes": data.classes,
            "rounds": rounds,
            "test": {side: {k: test[side][k] for k in keys if k in test[side]} for side in ("baseline", "final")},
            "timings_s": self.events.timings(),
            "synthetic_in_eval_splits": int(test.get("synthetic_in_eval_splits", 0)),
        }
        atomic_write_json(rd / "summary.json", summary)
        return summary


def leak_pixel_threshold(result: FilterResult, default: float) -> float:
    """The pixel-correlation threshold the leakage filter applied in a round."""
    try:
        return float(result.thresholds["leakage"]["pixel_threshold_"])
    except (KeyError, TypeError, ValueError):
        return float(default)


current_run_dir: Path | None = None  # the run directory of the latest run_loop call in this process


def run_loop(cfg: RunConfig, run_dir: Path | None = None, *, progress: bool = True,
             echo: Callable[[str], None] = print, until: str | None = None) -> Path:
    """Start a run (a new directory under `cfg.output_dir` unless `run_dir` is given) and execute it."""
    created = run_dir is None or not Path(run_dir).exists()
    if run_dir is None:
        run_dir = new_run_dir(cfg.output_dir, cfg.name)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    global current_run_dir
    current_run_dir = run_dir  # the CLI names it when a Ctrl-C stops the run
    try:
        with RunLock(run_dir):
            if not (run_dir / "config.yaml").exists():
                from vision_si.classifier import resolve_device

                env = environment_info(cfg.seed, str(resolve_device(cfg.classifier.device)))
                import torch

                # CPU results are reproducible for a seed at a given thread count (float summation order)
                env["cpu_threads"] = cfg.threads or torch.get_num_threads()
                save_config(cfg, run_dir / "config.yaml.tmp")  # atomic: a kill never leaves half a config
                os.replace(run_dir / "config.yaml.tmp", run_dir / "config.yaml")
                atomic_write_json(run_dir / "env.json", env)
            with cpu_threads(cfg.threads), track_run(cfg, run_dir) as on_stage:  # on_stage: None unless tracking
                return Loop(cfg, run_dir, progress=progress, echo=echo, until=until, on_stage=on_stage).run()
    except InputError:
        # Bad input found while setting up a new run (data, checkpoints, resources): no stage is
        # complete, so the directory holds nothing worth keeping and is removed, not left half-written.
        if created and not _has_complete_stage(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Limit torch and the BLAS/OpenMP pools (numpy, scikit-learn) to `n` threads, restored on exit."""
    if n is None:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before)


def _has_complete_stage(run_dir: Path) -> bool:
    return (run_dir / "final").is_dir() or any(p.is_dir() for p in run_dir.glob("round-*/*") if p.suffix != ".tmp")


def check_resources(cfg: RunConfig, n_images: int, channels: int, run_dir: Path) -> None:
    """Refuse before any work a run whose images cannot fit on disk or in memory (an upper estimate).

    Disk: one round's `diagnose.budget_total` PNGs, each at most C×H×(W+1) bytes (8 bits, a filter
    byte per row, zlib's stored blocks) plus 1 KB of headers. Memory: the real images and one round
    of candidates as float32 C×H×W, candidates counted twice (their array and the filters' copies).
    """
    px = channels * cfg.data.image_size ** 2
    budget = cfg.diagnose.budget_total
    png = budget * (channels * cfg.data.image_size * (cfg.data.image_size + 1) * 1.001 + 1024)
    free = shutil.disk_usage(run_dir).free
    if png > free:
        raise ConfigError(f"diagnose.budget_total={budget}: one round of {budget} images of "
                          f"{channels}x{cfg.data.image_size}x{cfg.data.image_size} needs up to {png / 1e9:.1f} GB "
                          f"on disk, but {run_dir.parent} has {free / 1e9:.1f} GB free; lower the budget or "
                          "data.image_size")
    import psutil

    available = psutil.virtual_memory().available
    real, synthetic = n_images * px * 4, 2 * budget * px * 4
    if real > available:
        raise ConfigError(f"data.image_size={cfg.data.image_size}: {n_images} real images of {channels}x"
                          f"{cfg.data.image_size}x{cfg.data.image_size} need {real / 1e9:.1f} GB of memory, "
                          f"{available / 1e9:.1f} GB is available; lower data.image_size or data.max_per_class")
    if real + synthetic > available:
        raise ConfigError(f"diagnose.budget_total={budget}: {budget} candidate images of {channels}x"
                          f"{cfg.data.image_size}x{cfg.data.image_size} need {synthetic / 1e9:.1f} GB of memory "
                          f"besides the real images' {real / 1e9:.1f} GB; {available / 1e9:.1f} GB is available; "
                          "lower the budget or data.image_size")


def resume(run_dir: Path, *, progress: bool = True, echo: Callable[[str], None] = print,
           until: str | None = None) -> Path:
    """Continue a run from its last complete stage, with the configuration it was started with."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"'{run_dir}' is not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    return run_loop(cfg, run_dir, progress=progress, echo=echo, until=until)

