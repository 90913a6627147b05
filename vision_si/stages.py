"""The stages as a run calls them: each adapter turns the run's state into one stage function's typed inputs
and saves that stage's typed result in the stage folder it is handed.

| adapter    | calls                                  | writes (read back by)                              |
|------------|----------------------------------------|----------------------------------------------------|
| `train`    | `classifier.train_classifier`          | `seed-0/` checkpoint (`load_model`)                |
| `diagnose` | `diagnose.diagnose`, the report's plots| `Diagnosis.save` (`Diagnosis.load`)                |
| `generate` | `generators.runner.run_generation`     | `images/`, `manifest.jsonl` (`candidates`)         |
| `filter`   | `filter.filter_candidates`             | `FilterResult.save` (`FilterResult.load`)          |
| `gate`     | `gate.run_gate`                        | `GateDecision.save` (`GateDecision.load`), paired `baseline-k/`, `candidate-k/` |
| `final`    | `classifier.predict` on `test`, once   | `final/test.json` (`summary.write_summary`)        |

`val` is divided once (`data.judge_split`, `gate.judge_fraction`, the run's seed): the *selecting*
half feeds the diagnosis, the filter's threshold calibration, the training history and the gate's
calibration; the *judging* half is read only by the gate's decision. The diagnosis reads the selecting
half and the train split (with `diagnose.oof_folds`, train judged out of fold), never the judging half. The images that chose what a
round made never decide whether it joins training.

`generation_requests` is the one conversion of a diagnosis budget into generation requests, and
`Pool` holds the synthetic images the gate has accepted so far (they only ever join `train`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vision_si.budget import Allocation
from vision_si.classifier import TrainedClassifier, load_classifier, predict, train_classifier
from vision_si.config import LoopConfig, RunConfig
from vision_si.data import build_augmentation, judge_split
from vision_si.data.arrays import LabelledImages
from vision_si.data.real import RealData
from vision_si.diagnose import Diagnosis, diagnose
from vision_si.filter import FilterResult, ModelOutputs, filter_candidates, read_reviews
from vision_si.gate import GateDecision, fit_calibration, paired_interval, run_gate
from vision_si.generators import GenerationRequest, ManifestRow
from vision_si.generators.ray_engine import engine_generate_fn
from vision_si.generators.runner import load_generated, read_manifest, run_generation
from vision_si.invariants import Invariants
from vision_si.metrics import bootstrap_interval, classification_metrics
from vision_si.oof import out_of_fold
from vision_si.report_plots import write_diagnosis_plots
from vision_si.rundir import atomic_write_json

TEST_LABELS_WITHHELD = -1  # the label the filter sees for a test image: it compares pixels, never labels


def generation_requests(budget: Sequence[Allocation], loop: LoopConfig, rejected: int) -> list[GenerationRequest]:
    """The diagnosis budget as generation requests, each in its allocation's own mode and strength.

    After `rejected` rejected rounds in a row (with `loop.on_reject: adapt`; 0 otherwise) a round asks
    for `count × loop.adapt_budget_factor^rejected` images per allocation (rounded; an allocation
    that rounds to 0 is left out) at strength `× loop.adapt_strength_factor^rejected`, so it does not
    simply repeat what the gate refused.
    """
    adapt = rejected if loop.on_reject == "adapt" else 0
    out = []
    for a in budget:
        count = int(round(a.count * loop.adapt_budget_factor ** adapt))
        if count > 0:
            out.append(GenerationRequest(class_index=a.class_index, class_name=a.class_name, slice_id=a.slice_id,
                                         count=count, exemplar_ids=list(a.exemplar_ids), mode=a.mode,
                                         strength=float(a.strength) * loop.adapt_strength_factor ** adapt))
    return out


@dataclass
class Pool:
    """Synthetic images accepted by filter and gate so far, each with the leak threshold it passed."""

    images: LabelledImages
    leak_pixel: list[float] = field(default_factory=list)

    @classmethod
    def empty(cls, channels: int, size: int) -> Pool:
        return cls(LabelledImages.empty(channels, size))

    def __len__(self) -> int:
        return len(self.images)

    @property
    def ids(self) -> list[str]:
        return list(self.images.ids)

    def add(self, new: LabelledImages, leak_pixel: float) -> None:
        self.images = LabelledImages.concat([self.images, new])
        self.leak_pixel += [float(leak_pixel)] * len(new)


class Stages:
    """The adapters of one run over its real data (`RealData`) and its invariants."""

    def __init__(self, cfg: RunConfig, data: RealData, guard: Invariants, run_dir: Path, *,
                 progress: bool = True) -> None:
        self.cfg, self.data, self.guard, self.run_dir, self.progress = cfg, data, guard, Path(run_dir), progress
        self.channels = int(data.pixels("train").shape[1])
        self.encoder = None  # the self-supervised encoder, when the run has one (Loop.pretrain_stage)
        select, judge = judge_split(data.labels("val"), cfg.gate.judge_fraction, cfg.seed)
        self._val_select_rows = data.index("val")[select]  # table rows of the selecting half
        val = data.split("val")
        self.val_select, self.val_judge = val.subset(select), val.subset(judge)

    # ------------------------------------------------------------------ models
    def augment(self, seed: int) -> Any:
        return build_augmentation(self.cfg.data.augment, self.channels, seed)

    def predict(self, clf: TrainedClassifier, images: np.ndarray):
        return predict(clf, images, batch_size=self.cfg.classifier.predict_batch_size)

    def load_model(self, path: Path) -> TrainedClassifier:
        # a checkpoint swapped in from another run (other arch or class list) is refused, naming the file
        return load_classifier(path, self.cfg.classifier.device, arch=self.cfg.classifier.arch,
                               classes=self.data.classes)

    def critic(self, round0: TrainedClassifier) -> TrainedClassifier:
        """The frozen critic `filter.critic` names: `round0`, the round-0 baseline (real data only)."""
        return {"round0": round0}[self.cfg.filter.critic]

    # ------------------------------------------------------------------ stage bodies
    def train(self, pool: Pool, seed: int, out_dir: Path) -> TrainedClassifier:
        d, p = self.data, pool.images
        self.guard.no_synthetic_in_eval(pool.ids)
        return train_classifier(
            self.cfg.classifier, d.pixels("train"), d.labels("train"), classes=d.classes, seed=seed,
            out_dir=out_dir, val_images=self.val_select.images, val_labels=self.val_select.labels,
            extra_images=p.images if len(p) else None, extra_labels=p.labels if len(p) else None,
            extra_ids=pool.ids or None, augment=self.augment(seed), progress=self.progress)

    def diagnose(self, model: TrainedClassifier, out: Path) -> None:
        """Reads the selecting half of val and the train split (never the judging half, never test).

        With `diagnose.oof_folds`, `oof_folds` classifiers are cross-fitted over the real train split into
        `out/oof/fold-k/` and the train images are judged by the fold model that did not train on them;
        with the run's encoder (`pretrain.use_for` holding `diagnosis`) its embeddings are a second view.
        """
        val, train = self.val_select, self.data.split("train")
        val_out, train_out = self.predict(model, val.images), self.predict(model, train.images)
        g, dc = self.cfg.generate, self.cfg.diagnose
        oof = None
        if dc.oof_folds:
            oof = out_of_fold(self.cfg.classifier, train.images, train.labels, classes=self.data.classes,
                              n_folds=dc.oof_folds, seed=self.cfg.seed, out_dir=out / "oof", epochs=dc.oof_epochs,
                              val_images=val.images, val_labels=val.labels, augment=self.augment,
                              progress=self.progress)
        views = {}
        if self.encoder is not None and "diagnosis" in self.cfg.pretrain.use_for:
            views["ssl"] = (self.encoder.embed(val.images), self.encoder.embed(train.images))
        diag = diagnose(dc, classes=self.data.classes, val=val, val_probs=val_out.probs,
                        val_embeddings=val_out.embeddings, train=train, train_embeddings=train_out.embeddings,
                        seed=self.cfg.seed, mode=g.mode, strength=g.strength,
                        train_probs=None if oof is None else oof.probs, train_folds=None if oof is None else oof.folds,
                        metadata=self.metadata_columns(), extra_views=views)
        diag.save(out)
        # exemplar grids show training exemplars and the val images the slice gets wrong
        by_id = dict(zip(train.ids, train.images, strict=True)) | dict(zip(val.ids, val.images, strict=True))
        write_diagnosis_plots(diag, out, val_embeddings=val_out.embeddings, val_labels=val.labels,
                              val_probs=val_out.probs, seed=self.cfg.seed, images_by_id=by_id)

    def metadata_columns(self, max_values: int = 20) -> dict[str, np.ndarray]:
        """The table's categorical metadata (at most `max_values` distinct values, e.g. ELPV's cell type),
        one value per selecting-val then train image, as the diagnosis describes slices by it."""
        rows = np.concatenate([self._val_select_rows, self.data.index("train")])
        meta = [self.data.table.metadata[i] for i in rows] if self.data.table.metadata else []
        columns = {}
        for key in sorted({key for m in meta for key in m}):
            values = np.array([str(m.get(key, "")) for m in meta], dtype=object)
            if 1 < len(set(values.tolist())) <= max_values:
                columns[key] = values
        return columns

    def generate(self, requests: list[GenerationRequest], id_prefix: str, current: TrainedClassifier,
                 out: Path) -> None:
        # guided mode steers sampling with the gradient of the model being improved (never the critic)
        guide = current.logits if any(q.mode == "guided" for q in requests) else None
        run_generation(self.cfg.generate, requests, train=self.data.split("train"), classes=self.data.classes,
                       out_dir=out, seed=self.cfg.seed, id_prefix=id_prefix, classifier_fn=guide,
                       progress=self.progress, generate_fn=engine_generate_fn(self.cfg.generate))

    def candidates(self, gen_dir: Path) -> tuple[list[ManifestRow], LabelledImages]:
        """A round's generated images as read back from its folder (paths and sha256 checked)."""
        rows = read_manifest(gen_dir / "manifest.jsonl")
        self.guard.no_synthetic_in_eval([r.id for r in rows], [r.sha256 for r in rows])
        images = load_generated(gen_dir, rows, self.cfg.data, channels=self.channels)
        return rows, LabelledImages(images, np.asarray([r.class_index for r in rows], np.int64),
                                    [r.id for r in rows], [r.sha256 for r in rows])

    def filter(self, pool: Pool, critic: TrainedClassifier, current: TrainedClassifier, cands: LabelledImages,
               out: Path) -> None:
        d = self.data
        val = LabelledImages.concat([self.val_select, self.val_judge])  # the critic's calibration: the first rows
        test = LabelledImages(self.guard.test_pixels("leakage check"),
                              np.full(len(d.index("test")), TEST_LABELS_WITHHELD, np.int64), d.ids("test"),
                              d.sha256("test"))
        evaluation = LabelledImages.concat([val, test])
        crit_c, crit_eval = self.predict(critic, cands.images), self.predict(critic, evaluation.images)
        outputs = ModelOutputs(
            candidate_probs=crit_c.probs, candidate_emb=crit_c.embeddings,
            current_probs=self.predict(current, cands.images).probs,
            train_emb=self.predict(critic, d.pixels("train")).embeddings, eval_emb=crit_eval.embeddings,
            pool_emb=self.predict(critic, pool.images.images).embeddings if len(pool) else None,
            val_probs=crit_eval.probs[: len(self.val_select)])
        res = filter_candidates(self.cfg.filter, candidates=cands, real_train=d.split("train"),
                                evaluation=evaluation, outputs=outputs, pool=pool.images if len(pool) else None,
                                reviews=read_reviews(self.run_dir / "reviews.csv"), seed=self.cfg.seed)
        res.save(out)

    def gate(self, pool: Pool, current: TrainedClassifier, new: LabelledImages, diag: Diagnosis,
             leak_pixel: float, out: Path) -> None:
        d, p = self.data, pool.images
        self.guard.no_synthetic_in_eval(pool.ids + new.ids)
        self.guard.no_near_copies(np.concatenate([p.images, new.images]), pool.ids + new.ids,
                                  pool.leak_pixel + [leak_pixel] * len(new))
        weak = sorted({a.class_index for a in diag.budget}) or None
        g = self.cfg.generate
        decision = run_gate(self.cfg.gate, self.cfg.classifier, train=d.split("train"), pool=p if len(p) else None,
                            candidates=new, select=self.val_select, judge=self.val_judge, classes=d.classes,
                            seed=self.cfg.seed, out_dir=out, current=current, augment=self.augment,
                            weak_classes=weak, engine=g.engine, ray_address=g.ray_address, progress=self.progress)
        decision.save(out)

    def final(self, pool: Pool, model: TrainedClassifier, synthetic_ids: list[str], accepted_round: int | None,
              out: Path) -> None:
        """The round-0 model and the final one on `test`, once (`Invariants.record_test_evaluation`).

        When a round was accepted, its paired gate models (baseline-k against candidate-k, trained alike
        but for the pool) are scored on `test` too: the pool's own effect, with an interval over the
        paired seeds. The two single models' intervals are over test images only and say so.
        """
        d = self.data
        self.guard.no_synthetic_in_eval(synthetic_ids)
        self.guard.no_near_copies(pool.images.images, pool.ids, pool.leak_pixel)
        baseline = self.load_model(self.run_dir / "round-00/train/seed-0")
        pairs = self._accepted_pairs(accepted_round)
        self.guard.record_test_evaluation([baseline.checkpoint_sha256, model.checkpoint_sha256]
                                          + [m.checkpoint_sha256 for side in pairs for m in side])
        test_x, test_y = d.pixels("test"), d.labels("test")
        result: dict[str, Any] = {"n_images": int(len(test_y)), "synthetic_in_eval_splits": 0,
                                  "ci_method": "percentile bootstrap over test images, one model: training noise "
                                               "not included (see synthetic_effect for the seed-level comparison)"}
        for name, clf in (("baseline", baseline), ("final", model)):
            preds = self.predict(clf, test_x).probs.argmax(1)
            m = classification_metrics(test_y, preds, d.classes)
            for metric in ("accuracy", "balanced_accuracy", "macro_f1"):
                m[f"{metric}_ci"] = list(bootstrap_interval(test_y, preds, len(d.classes), metric, seed=self.cfg.seed,
                                                            n_bootstrap=self.cfg.gate.n_bootstrap))
            m["model"] = str(clf.path)
            result[name] = m
        if pairs:
            result["synthetic_effect"] = self._paired_test_effect(pairs, accepted_round)
        atomic_write_json(out / "test.json", result)

    def _accepted_pairs(self, accepted_round: int | None) -> list[list[TrainedClassifier]]:
        if accepted_round is None:
            return []
        gate_dir = self.run_dir / f"round-{accepted_round:02d}" / "gate"
        n = len(GateDecision.load(gate_dir).seeds)
        return [[self.load_model(gate_dir / f"{side}-{k}") for k in range(n)] for side in ("baseline", "candidate")]

    def _paired_test_effect(self, pairs: list[list[TrainedClassifier]], accepted_round: int) -> dict[str, Any]:
        """Candidate minus baseline side on `test`, each model calibrated on the selecting val images as the gate did."""
        sel, test = self.val_select, self.data.split("test")
        k = len(self.data.classes)

        def calibrated(model: TrainedClassifier) -> np.ndarray:
            def log_probs(x: np.ndarray) -> np.ndarray:
                z = self.predict(model, x).logits.astype(np.float64)
                return z - np.logaddexp.reduce(z, axis=1, keepdims=True)

            return fit_calibration(log_probs(sel.images), sel.labels).apply(log_probs(test.images))

        base, cand = (np.stack([calibrated(m) for m in side]) for side in pairs)
        prior = np.bincount(sel.labels, minlength=k) / max(len(sel), 1)
        out: dict[str, Any] = {"round": accepted_round, "seeds": len(pairs[0])}
        for metric in (self.cfg.gate.metric, "macro_f1"):
            iv = paired_interval(metric, test.labels, base, cand, prior, one_sided_alpha=(1 - self.cfg.gate.confidence) / 2,
                                 n_bootstrap=self.cfg.gate.n_bootstrap, seed=self.cfg.seed)
            out[metric] = {"delta": iv.delta, "ci": [iv.lower, iv.upper], "per_seed": iv.per_seed, "method": iv.method}
        return out


def accepted_candidates(cands: LabelledImages, result: FilterResult) -> LabelledImages:
    """The candidates the filter accepted, in candidate order."""
    return cands.subset(np.isin(cands.ids, list(result.accepted_ids)))

