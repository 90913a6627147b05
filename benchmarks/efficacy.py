"""Efficacy benchmark: does targeted synthesis beat the baselines a careful practitioner tries first?

    python benchmarks/efficacy.py --profile quick                       # arms A-E, the profile's seeds
    python benchmarks/efficacy.py --profile quick --arms E-nofilter E-nogate E-class
    python benchmarks/efficacy.py --profile quick --protocol deitsch     # 75/25, 4-class accuracy

Arms (same real splits, classifier recipe and optimizer-step budget everywhere; seeds vary the
classifier, the split seed stays fixed):
  A  real data, `standard` augmentation, no balanced sampling
  B  A + class-balanced sampling + the `strong` albumentations preset (the baseline to beat)
  C  B + E's exemplars oversampled (real copies, albumentations only), as many as E added
  D  B + untargeted class-mode images of the same generator, as many as E added, uniform over classes
  E  the loop (`run_loop`): diagnosis-targeted exemplar generation, filter, gate, on B's recipe
  E-nofilter / E-nogate / E-class / E-guided  ablations of E (filter.enabled=[], gate.enabled=false, class
  mode, classifier-guided mode)

"As many as E added" is the number of synthetic images in E's final training set; when E's gate
refused every round it is the number E's filter passed to the gate in round 1 (the pool that was
weighed), so that C and D stay comparable with what E put forward. The rule applied is recorded.

Metrics are read on the real `test` split only (point, 95% bootstrap interval; differences against
B paired over test images, per seed and pooled as seeds × N). `val` figures are recorded beside them
as the evidence that is allowed to explain a result. Work lives under `benchmarks/results/work/`
(git-ignored): a finished model, generation or loop stage is reused, so a re-run resumes.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from vision_si.classifier import load_classifier, predict, train_classifier
from vision_si.config import RunConfig, apply_overrides, config_from_dict, config_to_dict
from vision_si.data import build_augmentation, load_images, load_source, make_splits
from vision_si.data.arrays import LabelledImages
from vision_si.errors import ConfigError
from vision_si.filter import FilterResult
from vision_si.generators import GenerationRequest
from vision_si.generators.runner import load_generated, read_manifest, run_generation
from vision_si.metrics import bootstrap_interval, classification_metrics, paired_bootstrap
from vision_si.rundir import atomic_write_json, atomic_write_text, read_json

HERE = Path(__file__).resolve().parent
PROFILES = HERE / "efficacy_profiles"
RESULTS = HERE / "results"
ARMS = ("A", "B", "C", "D", "E", "E-nofilter", "E-nogate", "E-class", "E-guided")
LOOP_ARMS = {"E": [], "E-nofilter": ["filter.enabled=[]"], "E-nogate": ["gate.enabled=false"],
             "E-class": ["generate.mode=class"], "E-guided": ["generate.mode=guided"]}
# stages of E's run directory that an ablation can take over unchanged (they do not read what it changes)
ABLATION_REUSE = {"E-nofilter": ["round-00/train", "round-00/diagnose", "round-01/generate"],
                  "E-nogate": ["round-00/train", "round-00/diagnose", "round-01/generate", "round-01/filter"],
                  "E-class": ["round-00/train"], "E-guided": ["round-00/train"]}
DEITSCH = {"cnn_accuracy": 0.8842, "svm_accuracy": 0.8244,
           "reference": "Deitsch et al. (2019), Solar Energy 185, 455-468: stratified 75/25 split, 4 classes"}
METRICS = ("macro_f1", "balanced_accuracy", "accuracy")


# --------------------------------------------------------------------------- profile and data


def load_profile(name_or_path: str) -> dict[str, Any]:
    """A profile YAML (`seeds`, `arms`, `n_bootstrap`, `run`: a RunConfig mapping) by name or path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PROFILES / f"{name_or_path}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise ConfigError(f"efficacy profile '{name_or_path}' not found; available: {', '.join(names)}")
    profile = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    profile.setdefault("name", path.stem)
    return profile


def run_config(profile: dict[str, Any], overrides: Sequence[str] = ()) -> RunConfig:
    run = apply_overrides(profile.get("run") or {}, list(overrides))
    return config_from_dict(run, where="run")


class Real:
    """The real splits, made once from the fixed split seed and shared by every arm and seed."""

    def __init__(self, cfg: RunConfig, *, merge_val: bool = False) -> None:
        split_seed = cfg.seed if cfg.data.split.seed is None else cfg.data.split.seed
        self.table = load_source(cfg.data, split_seed, progress=False)
        splits = make_splits(self.table, cfg.data.split, split_seed)
        if merge_val:  # Deitsch protocol: everything that is not test trains
            splits = np.where(splits == "val", "train", splits)
        self.index = {s: np.flatnonzero(splits == s) for s in ("train", "val", "test")}
        self.classes = list(self.table.classes)
        self.x = {s: load_images(self.table, self.index[s], cfg.data) for s in self.index if len(self.index[s])}
        self.y = {s: self.table.labels[self.index[s]].astype(np.int64) for s in self.index}
        self.ids = {s: [self.table.ids[i] for i in self.index[s]] for s in self.index}
        self.channels = int(self.x["train"].shape[1])

    def val(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        return (self.x["val"], self.y["val"]) if "val" in self.x else (None, None)

    def split(self, s: str) -> LabelledImages:
        return LabelledImages(self.x[s], self.y[s], self.ids[s], [self.table.sha256[i] for i in self.index[s]])

    def with_train(self, rows: np.ndarray) -> Real:
        """A view whose train split is `rows` (positions in train, in order); val and test are shared."""
        view = copy.copy(self)
        rows = np.asarray(rows, np.int64)
        view.index = {**self.index, "train": self.index["train"][rows]}
        view.x = {**self.x, "train": self.x["train"][rows]}
        view.y = {**self.y, "train": self.y["train"][rows]}
        view.ids = {**self.ids, "train": [self.ids["train"][i] for i in rows]}
        return view


# --------------------------------------------------------------------------- arms


class Bench:
    """Runs the arms of one profile for one seed at a time; every product is cached under `work`.

    `base_arm` is the arm whose model E's round 0 takes over; `extra_arms` are the arms trained on the
    real data plus the extra images `extras(arm, seed)` returns (subclasses add their own)."""

    base_arm = "B"
    extra_arms: tuple[str, ...] = ("C", "D")

    def __init__(self, profile: dict[str, Any], work: Path, *, protocol: str = "default", progress: bool = False,
                 echo: Callable[[str], None] = print) -> None:
        self.profile, self.work, self.protocol, self.progress, self.echo = profile, Path(work), protocol, progress, echo
        self.gen_cache = self.work / "generators"
        self.base = run_config(profile, [f"generate.cache_dir={self.gen_cache}"])
        self.real = Real(self.base, merge_val=protocol == "deitsch")
        self.generator_seed = int(profile.get("generator_seed", 0))

    def cfg(self, arm: str, seed: int) -> RunConfig:
        over = [f"seed={seed}", f"name={self.base.name}-{arm}-s{seed}", f"generate.cache_dir={self.gen_cache}"]
        if arm == "A":
            over += ["classifier.sampling=natural", "data.augment=standard"]
        over += LOOP_ARMS.get(arm, [])
        return run_config(self.profile, over)

    def share_generator(self, seed: int) -> None:
        """One generator training for every seed: the loop keys its generator cache by the run seed, so the
        entry trained with `generator_seed` is copied under the key of `seed` (its meta.json keeps the
        seed it was really trained with). Seeds then vary the classifier and the sampling noise only."""
        from vision_si.generators import create_generator, resolve_preset
        from vision_si.generators.ddpm import cache_key
        from vision_si.generators.presets import generator_kwargs
        from vision_si.generators.runner import fit_generator

        cfg = self.cfg("E", seed).generate
        preset = resolve_preset(cfg)
        if preset["backend"] != "ddpm":
            return
        settings = create_generator(preset["backend"], **generator_kwargs(preset)).settings()
        x, y, classes = self.real.x["train"], self.real.y["train"], self.real.classes
        key_g = cache_key(x, y, classes, settings, self.generator_seed)
        shared = self.gen_cache / key_g
        if not (shared / "meta.json").is_file():
            default = resolve_path_default() / key_g  # the library's default cache may hold it already
            if (default / "meta.json").is_file():
                shutil.copytree(default, shared)
            else:
                self.echo(f"training the shared generator (seed {self.generator_seed})")
                fit_generator(cfg, self.real.split("train"), classes, seed=self.generator_seed, progress=self.progress)
        alias = self.gen_cache / cache_key(x, y, classes, settings, seed)
        if not alias.exists():
            shutil.copytree(shared, alias)

    def arm_dir(self, arm: str, seed: int) -> Path:
        return self.work / f"seed-{seed}" / arm

    def train(self, arm: str, seed: int, extra: tuple[np.ndarray, np.ndarray, list[str]] | None = None):
        cfg = self.cfg(arm, seed)
        vx, vy = self.real.val()
        ex, ey, eids = extra if extra is not None and len(extra[1]) else (None, None, None)
        return train_classifier(cfg.classifier, self.real.x["train"], self.real.y["train"], classes=self.real.classes,
                                seed=seed, out_dir=self.arm_dir(arm, seed) / "model", val_images=vx, val_labels=vy,
                                extra_images=ex, extra_labels=ey, extra_ids=eids,
                                augment=build_augmentation(cfg.data.augment, self.real.channels, seed),
                                progress=self.progress)

    def run_arm(self, arm: str, seed: int) -> dict[str, Any]:
        """Train (or load) one arm at one seed; returns its record with val and test predictions."""
        out = self.arm_dir(arm, seed) / "result.json"
        if out.is_file():
            return read_json(out)
        start = time.time()
        self.echo(f"seed {seed} arm {arm}: start")
        info: dict[str, Any] = {}
        if arm in ("A", "B"):
            clf = self.train(arm, seed)
        elif arm in self.extra_arms:
            extra, info = self.extras(arm, seed)
            clf = self.train(arm, seed, extra)
        elif arm in LOOP_ARMS:
            clf, info = self.loop(arm, seed)
        else:
            raise ConfigError(f"unknown arm '{arm}'; allowed: {', '.join(ARMS)}")
        cache = self.arm_dir(arm, seed) / "predictions"
        record = {"arm": arm, "seed": seed, "model": str(clf.path), "seconds": None, **info,
                  "n_synthetic_in_training": int(clf.meta.get("n_synthetic", 0))}
        for split in ("val", "test"):
            if split in self.real.x:
                probs = predict(clf, self.real.x[split], cache_dir=cache).probs
                record[f"{split}_preds"] = probs.argmax(1).astype(int).tolist()
        record["seconds"] = round(time.time() - start, 1)
        atomic_write_json(out, record)
        self.echo(f"seed {seed} arm {arm}: done in {record['seconds']:.0f}s")
        return record

    def extras(self, arm: str, seed: int) -> tuple[tuple, dict[str, Any]]:
        """The extra training images of arm C or D (as many as E added) and their record."""
        e = self.run_arm("E", seed)
        return self.oversample(e, seed) if arm == "C" else self.untargeted(e, seed)

    # ------------------------------------------------------------------ E and its ablations
    def loop(self, arm: str, seed: int):
        from vision_si.loop import run_loop

        cfg = self.cfg(arm, seed)
        run_dir = self.arm_dir(arm, seed) / "run"
        if not (run_dir / "round-00" / "train").is_dir():
            self.seed_run_dir(arm, seed, run_dir)
        run_loop(cfg, run_dir, progress=self.progress, echo=lambda m: self.echo(f"  [{arm} s{seed}] {m}"))
        summary = read_json(run_dir / "summary.json")
        test = read_json(run_dir / "final" / "test.json")
        clf = load_classifier(test["final"]["model"])
        rounds = []
        for r in summary["rounds"]:
            entry = {k: r.get(k) for k in ("round", "generated", "accepted_by_filter", "rejected_by_filter")}
            gate_dir = run_dir / f"round-{r['round']:02d}" / "gate"
            if (gate_dir / "decision.json").is_file():
                d = read_json(gate_dir / "decision.json")
                entry["gate"] = {k: d.get(k) for k in ("decision", "reason_code", "reason", "metric", "before",
                                                       "after", "delta", "per_class", "regressions", "would_accept")}
            rounds.append(entry)
        info = {"run_dir": str(run_dir), "rounds": rounds,
                "loop_test_final": {k: summary["test"]["final"].get(k) for k in METRICS},
                "synthetic_in_eval_splits": summary.get("synthetic_in_eval_splits")}
        return clf, info

    def seed_run_dir(self, arm: str, seed: int, run_dir: Path) -> None:
        """Hand the loop work it would otherwise redo: `base_arm`'s model as round 0 (same recipe, seed and
        data; `train_classifier` reuses it when its fingerprint matches), and for ablations E's unchanged stages."""
        self.share_generator(seed)
        if arm == "E":
            self.run_arm(self.base_arm, seed)
            dst = run_dir / "round-00" / "train.tmp" / "seed-0"
            if not dst.exists():
                shutil.copytree(self.arm_dir(self.base_arm, seed) / "model", dst)
            return
        self.run_arm("E", seed)
        src = self.arm_dir("E", seed) / "run"
        for stage in ABLATION_REUSE[arm]:
            if (src / stage).is_dir() and not (run_dir / stage).exists():
                shutil.copytree(src / stage, run_dir / stage)
        for name in ("splits.sha256", "splits.csv"):  # the split with its digest, or the run refuses it
            if (src / name).is_file():
                shutil.copy2(src / name, run_dir / name)

    def e_additions(self, e: dict[str, Any]) -> tuple[list[Any], str]:
        """Manifest rows of the synthetic images E added (see the module doc for the fallback)."""
        run_dir = Path(e["run_dir"])
        added, weighed = [], []
        for r in e["rounds"]:
            tag = run_dir / f"round-{r['round']:02d}"
            rows = read_manifest(tag / "generate" / "manifest.jsonl")
            accepted = set(FilterResult.load(tag / "filter").accepted_ids) if (tag / "filter").is_dir() else set()
            passed = [row for row in rows if row.id in accepted]
            if r.get("gate", {}).get("decision") == "accepted":
                added += passed
            if r["round"] == 1:
                weighed = passed
        if added:
            return added, "synthetic images in E's final training set"
        return weighed, "E's gate added none: images E's filter passed to the gate in round 1"

    def oversample(self, e: dict[str, Any], seed: int) -> tuple[tuple, dict[str, Any]]:
        rows, rule = self.e_additions(e)
        by_id = {i: k for k, i in enumerate(self.real.ids["train"])}
        rng = np.random.default_rng(seed)
        picks, labels, ids = [], [], []
        for n, row in enumerate(rows):
            ex = [i for i in row.exemplar_ids if i in by_id]
            if ex:
                k = by_id[ex[0]]
            else:  # a class-mode row has no exemplar: a real image of its class stands in
                k = int(rng.choice(np.flatnonzero(self.real.y["train"] == row.class_index)))
            picks.append(k)
            labels.append(int(row.class_index))
            ids.append(f"oversample-{n:06d}-{self.real.ids['train'][k]}")
        x = self.real.x["train"][picks] if picks else None
        info = {"n_extra": len(picks), "extra_rule": rule, "n_distinct_exemplars": len(set(picks)),
                "extra_per_class": _per_class(labels, self.real.classes)}
        return (x, np.asarray(labels, np.int64), ids), info

    def untargeted(self, e: dict[str, Any], seed: int) -> tuple[tuple, dict[str, Any]]:
        rows, rule = self.e_additions(e)
        n, k = len(rows), len(self.real.classes)
        counts = [n // k + (1 if c < n % k else 0) for c in range(k)]
        cfg = self.cfg("D", seed)
        gen_cfg = cfg.generate
        gen_cfg.mode = "class"
        requests = [GenerationRequest(class_index=c, class_name=self.real.classes[c], slice_id="untargeted",
                                      count=counts[c], mode="class", strength=gen_cfg.strength)
                    for c in range(k) if counts[c]]
        self.share_generator(seed)
        out = self.arm_dir("D", seed) / "generate"
        info = {"n_extra": n, "extra_rule": rule, "extra_per_class": dict(zip(self.real.classes, counts, strict=True))}
        if not requests:
            return (None, np.zeros(0, np.int64), []), info
        res = run_generation(gen_cfg, requests, train=self.real.split("train"), classes=self.real.classes, out_dir=out,
                             seed=seed, id_prefix="syn-d", classifier_fn=None, progress=self.progress)
        x = load_generated(out, res.rows, cfg.data, channels=self.real.channels)
        info["generator_sha256"] = res.generator_sha256
        return (x, np.asarray([row.class_index for row in res.rows], np.int64), [row.id for row in res.rows]), info


def resolve_path_default() -> Path:
    from vision_si.config import GenerateConfig, resolve_path

    return resolve_path(GenerateConfig().cache_dir)


def _per_class(labels: Sequence[int], classes: list[str]) -> dict[str, int]:
    return {c: int(sum(1 for v in labels if v == k)) for k, c in enumerate(classes)}


# --------------------------------------------------------------------------- metrics


def _metric_list(classes: list[str]) -> list[tuple[str, str, list[int] | None]]:
    """(name, metric for vision_si.metrics, weak_classes): the three averages and every class's recall."""
    out = [(m, m, None) for m in METRICS]
    return out + [(f"recall/{c}", "weak_class_recall", [k]) for k, c in enumerate(classes)]


def _value(labels: np.ndarray, preds: np.ndarray, classes: list[str], name: str) -> float:
    m = classification_metrics(labels, preds, classes)
    return float(m["per_class"][name.split("/", 1)[1]]["recall"]) if name.startswith("recall/") else float(m[name])


def score(labels: np.ndarray, preds: np.ndarray, classes: list[str], *, n_bootstrap: int, seed: int) -> dict[str, Any]:
    """Point values (mean over seeds for seeds × N) and 95% bootstrap intervals of every metric."""
    preds = np.atleast_2d(preds)
    k = len(classes)
    out = {}
    for name, metric, weak in _metric_list(classes):
        point = float(np.mean([_value(labels, p, classes, name) for p in preds]))
        lo, hi = bootstrap_interval(labels, preds, k, metric, n_bootstrap=n_bootstrap, seed=seed, weak_classes=weak)
        out[name] = {"value": point, "ci": [lo, hi]}
    return out


def paired(labels: np.ndarray, base: np.ndarray, other: np.ndarray, classes: list[str], *, n_bootstrap: int,
           seed: int) -> dict[str, Any]:
    """metric(other) - metric(base) on the same resampled test images, for every metric."""
    out = {}
    for name, metric, weak in _metric_list(classes):
        d = paired_bootstrap(labels, base, other, len(classes), metric, n_bootstrap=n_bootstrap, seed=seed,
                             weak_classes=weak)
        out[name] = {"delta": d["delta"], "ci": [d["lower"], d["upper"]], "p_not_better": d["p_not_better"]}
    return out


def evaluate(records: dict[str, dict[int, dict]], real: Real, *, n_bootstrap: int, split: str = "test",
             baseline: str = "B") -> dict[str, Any]:
    """Per arm: per-seed and pooled scores on `split`; paired differences against `baseline`."""
    y, classes = real.y[split], real.classes
    key = f"{split}_preds"
    out: dict[str, Any] = {}
    for arm, by_seed in records.items():
        seeds = sorted(s for s, r in by_seed.items() if key in r)
        if not seeds:
            continue
        preds = np.array([by_seed[s][key] for s in seeds])
        entry: dict[str, Any] = {"seeds": seeds, "pooled": score(y, preds, classes, n_bootstrap=n_bootstrap, seed=0),
                                 "per_seed": {str(s): score(y, preds[i], classes, n_bootstrap=n_bootstrap, seed=s)
                                              for i, s in enumerate(seeds)}}
        base = records.get(baseline, {})
        common = [s for s in seeds if key in base.get(s, {})]
        if arm != baseline and common:
            b = np.array([base[s][key] for s in common])
            o = np.array([by_seed[s][key] for s in common])
            entry["vs_" + baseline] = {
                "seeds": common,
                "pooled": paired(y, b, o, classes, n_bootstrap=n_bootstrap, seed=0),
                "per_seed": {str(s): paired(y, b[i], o[i], classes, n_bootstrap=n_bootstrap, seed=s)
                             for i, s in enumerate(common)}}
        out[arm] = entry
    return out


# --------------------------------------------------------------------------- report


def _fmt(v: dict[str, Any]) -> str:
    return f"{v['value']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]"


def _fmt_d(v: dict[str, Any]) -> str:
    return f"{v['delta']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]"


def evidence(result: dict[str, Any]) -> str:
    """A plain statement of what the numbers show, composed from them (never edited by hand)."""
    test = result["test"]
    scarce = f"recall/{result['scarcest_class']}"
    lines = []
    e = test.get("E")
    if e is None:
        return "Arm E has not finished; no statement about the loop can be made yet."
    parts = []
    goal = True
    for other in ("B", "C", "D"):
        if other not in test:
            goal = False
            parts.append(f"{other} did not run")
            continue
        seeds = sorted(set(test[other]["seeds"]) & set(e["seeds"]))
        d_f1 = e["pooled"]["macro_f1"]["value"] - test[other]["pooled"]["macro_f1"]["value"]
        d_rc = e["pooled"][scarce]["value"] - test[other]["pooled"][scarce]["value"]
        ci = ""
        if other == "B" and "vs_B" in e:
            vf, vr = e["vs_B"]["pooled"]["macro_f1"], e["vs_B"]["pooled"][scarce]
            ci = f" (paired 95% CI {vf['ci'][0]:+.3f} to {vf['ci'][1]:+.3f}; scarce-class recall CI " \
                 f"{vr['ci'][0]:+.3f} to {vr['ci'][1]:+.3f})"
            goal &= vf["ci"][0] > 0 and vr["ci"][0] > 0
        goal &= d_f1 > 0 and d_rc > 0
        parts.append(f"E − {other}: macro-F1 {d_f1:+.3f}, recall of {result['scarcest_class']} {d_rc:+.3f}"
                     f"{ci} over {len(seeds)} seed(s)")
    lines.append(("The goal is met: " if goal else "The goal is NOT met: ")
                 + "E must beat B, C and D on macro-F1 and on the scarcest class's recall with the paired lower "
                   "bound against B above zero. " + "; ".join(parts) + ".")
    gates = [(s, r) for s, rec in result["loop_runs"].get("E", {}).items() for r in rec["rounds"]]
    if gates:
        acc = sum(1 for _, r in gates if r.get("gate", {}).get("decision") == "accepted")
        deltas = ", ".join(f"s{s} r{r['round']}: {r['gate']['delta']['value']:+.3f} "
                           f"[{r['gate']['delta']['ci'][0]:+.3f}, {r['gate']['delta']['ci'][1]:+.3f}]"
                           for s, r in gates if r.get("gate"))
        gen = sum(r.get("generated") or 0 for _, r in gates)
        passed = sum(r.get("accepted_by_filter") or 0 for _, r in gates)
        reasons: dict[str, int] = {}
        for _, r in gates:
            for k, v in (r.get("rejected_by_filter") or {}).items():
                reasons[k] = reasons.get(k, 0) + v
        top = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]) if v)
        codes: dict[str, int] = {}
        for _, r in gates:
            code = (r.get("gate") or {}).get("reason_code", "none")
            codes[code] = codes.get(code, 0) + 1
        lines.append(f"Inside E (val side only): the filter passed {passed} of {gen} generated images "
                     f"(rejections: {top or 'none'}); the gate accepted {acc} of {len(gates)} round(s) "
                     f"({', '.join(f'{k} {v}' for k, v in codes.items())}); "
                     f"val {gates[0][1].get('gate', {}).get('metric', 'macro_f1')} deltas of the retrained model "
                     f"against round 0: {deltas}.")
    for arm, by_seed in result["loop_runs"].items():
        if arm == "E":
            continue
        bits = []
        for s, rec in by_seed.items():
            for r in rec["rounds"]:
                g = r.get("gate") or {}
                d = g.get("delta") or {}
                ci = d.get("ci") or [float("nan"), float("nan")]
                bits.append(f"s{s}: {r.get('accepted_by_filter')}/{r.get('generated')} passed the filter, gate "
                            f"{g.get('decision', '-')} (val Δ {d.get('value', float('nan')):+.3f} "
                            f"[{ci[0]:+.3f}, {ci[1]:+.3f}])")
        lines.append(f"Ablation {arm}: " + "; ".join(bits) + ".")
    n_scarce = result.get("val_per_class", {}).get(result["scarcest_class"])
    gate_cfg = result.get("config", {}).get("gate", {})
    tol = gate_cfg.get("tolerance")
    if n_scarce and tol is not None and tol < 1 / n_scarce and not gate_cfg.get("tolerance_min_images"):
        lines.append(f"Note: val holds {n_scarce} images of {result['scarcest_class']}, so one image moves its recall "
                     f"by {1 / n_scarce:.3f}, more than the gate's per-class tolerance {tol}.")
    val = result.get("val", {})
    if "B" in val and "E" in val:
        lines.append(f"On val, E's final models average macro-F1 {val['E']['pooled']['macro_f1']['value']:.3f} and "
                     f"{result['scarcest_class']} recall {val['E']['pooled'][scarce]['value']:.3f}, against B's "
                     f"{val['B']['pooled']['macro_f1']['value']:.3f} and {val['B']['pooled'][scarce]['value']:.3f}.")
    return " ".join(lines)


def markdown(result: dict[str, Any]) -> str:
    classes, test = result["classes"], result["test"]
    scarce = f"recall/{result['scarcest_class']}"
    md = [f"# Efficacy on ELPV: profile `{result['profile']}`, protocol `{result['protocol']}`", "",
          f"Command: `{result['command']}`  ", f"Wall time of this invocation: {result['wall_s'] / 60:.1f} min; "
          f"test images: {result['n_test']}; classifier `{result['recipe']['arch']}`, {result['recipe']['steps']} "
          f"steps × batch {result['recipe']['batch_size']}, {result['image_size']} px.  ",
          "Runs gathered from the work folder (earlier invocations included): "
          + ", ".join(f"{a} {len(v)} seed(s)" for a, v in result["runs"].items())
          + f"; their wall times sum to {sum((r.get('seconds') or 0) for v in result['runs'].values() for r in v.values()) / 60:.0f} min "
          "(some ran in parallel; a run's time includes waiting for a shared generator).", ""]
    if result["protocol"] == "deitsch":
        md += ["## Deitsch et al. (2019) protocol", "", result["deitsch"]["note"], "",
               "| | 4-class accuracy |", "|---|---|"]
        for arm, v in test.items():
            md.append(f"| ours, arm {arm} ({len(v['seeds'])} seeds) | {_fmt(v['pooled']['accuracy'])} |")
        md += [f"| Deitsch et al., fine-tuned CNN | {DEITSCH['cnn_accuracy']:.4f} |",
               f"| Deitsch et al., SVM | {DEITSCH['svm_accuracy']:.4f} |", ""]
        return "\n".join(md) + "\n"
    md += ["## What the evidence shows", "", evidence(result), "",
           "## Test split (pooled over seeds: mean, 95% bootstrap interval over test images)", "",
           "| arm | seeds | macro-F1 | balanced acc. | accuracy | " + " | ".join(f"recall {c}" for c in classes) + " |",
           "|---|---|---|---|---|" + "---|" * len(classes)]
    for arm, v in test.items():
        p = v["pooled"]
        md.append(f"| {arm} | {len(v['seeds'])} | {_fmt(p['macro_f1'])} | {_fmt(p['balanced_accuracy'])} | "
                  f"{_fmt(p['accuracy'])} | " + " | ".join(f"{p['recall/' + c]['value']:.3f}" for c in classes) + " |")
    md += ["", "## Paired differences against B (test; pooled seeds × images, and per seed)", "",
           f"| arm | Δ macro-F1 | Δ balanced acc. | Δ accuracy | Δ {scarce} | per-seed Δ macro-F1 |",
           "|---|---|---|---|---|---|"]
    for arm, v in test.items():
        if "vs_B" not in v:
            continue
        p = v["vs_B"]["pooled"]
        per = ", ".join(f"s{s}: {d['macro_f1']['delta']:+.3f}" for s, d in v["vs_B"]["per_seed"].items())
        md.append(f"| {arm} | {_fmt_d(p['macro_f1'])} | {_fmt_d(p['balanced_accuracy'])} | {_fmt_d(p['accuracy'])} | "
                  f"{_fmt_d(p[scarce])} | {per} |")
    md += ["", "## Inside the loop arms (val side)", "",
           "| arm | seed | generated | passed filter | filter rejections | gate | val Δ (gate metric) | "
           "synthetic in final training |", "|---|---|---|---|---|---|---|---|"]
    for arm, by_seed in result["loop_runs"].items():
        for s, rec in by_seed.items():
            for r in rec["rounds"]:
                g = r.get("gate") or {}
                rej = ", ".join(f"{k} {v}" for k, v in (r.get("rejected_by_filter") or {}).items() if v) or "none"
                dv = (f"{g['delta']['value']:+.3f} [{g['delta']['ci'][0]:+.3f}, {g['delta']['ci'][1]:+.3f}]"
                      if g.get("delta") else "")
                md.append(f"| {arm} | {s} | {r.get('generated')} | {r.get('accepted_by_filter')} | {rej} | "
                          f"{g.get('decision', '')} ({g.get('reason_code', '')}) | {dv} | "
                          f"{rec['n_synthetic_in_training']} |")
    md += ["", "## Val split (pooled over seeds), for diagnosis only", "",
           f"| arm | macro-F1 | balanced acc. | {scarce} |", "|---|---|---|---|"]
    for arm, v in result.get("val", {}).items():
        p = v["pooled"]
        md.append(f"| {arm} | {_fmt(p['macro_f1'])} | {_fmt(p['balanced_accuracy'])} | {_fmt(p[scarce])} |")
    md += ["", "## Extra samples of C and D", "", "| arm | seed | n | rule | per class |", "|---|---|---|---|---|"]
    for arm in ("C", "D"):
        for s, rec in result["runs"].get(arm, {}).items():
            md.append(f"| {arm} | {s} | {rec.get('n_extra')} | {rec.get('extra_rule')} | {rec.get('extra_per_class')} |")
    return "\n".join(md) + "\n"


# --------------------------------------------------------------------------- driver


def reuse_work(profile: dict[str, Any], bench: Bench, seeds: Sequence[int]) -> None:
    """Take over another profile's work that this one would repeat bit for bit: arms A and B, the shared
    generator, and E's round 0 and round-1 generation. Allowed only when the two run configs agree on
    everything but the filter, the gate and the name, which those products never read."""
    other = load_profile(profile["reuse"])
    src = RESULTS / "work" / f"efficacy_{other.get('name')}"

    def comparable(p: dict[str, Any]) -> dict[str, Any]:
        d = config_to_dict(run_config(p))
        return {k: v for k, v in d.items() if k not in ("name", "filter", "gate")}

    if comparable(other) != comparable(profile):
        raise ConfigError(f"reuse: profile '{profile['reuse']}' differs from this one outside filter/gate/name")
    if (src / "generators").is_dir():
        bench.gen_cache.mkdir(parents=True, exist_ok=True)
        for entry in (src / "generators").iterdir():
            if entry.is_dir() and not entry.name.endswith((".partial",)) and not (bench.gen_cache / entry.name).exists():
                shutil.copytree(entry, bench.gen_cache / entry.name)
    for s in seeds:
        for arm in ("A", "B"):
            a, b = src / f"seed-{s}" / arm, bench.arm_dir(arm, s)
            if (a / "result.json").is_file() and not b.exists():
                shutil.copytree(a, b)
        e_src, e_dst = src / f"seed-{s}" / "E" / "run", bench.arm_dir("E", s) / "run"
        # round 0 trains gate.seeds models and the generation follows from it: take E's stages over only
        # when both profiles train as many (otherwise E reruns them, with the shared generator)
        same_seeds = other["run"].get("gate", {}).get("seeds", 1) == profile["run"].get("gate", {}).get("seeds", 1)
        for stage in ("round-00/train", "round-00/diagnose", "round-01/generate") if same_seeds else ():
            if (e_src / stage).is_dir() and not (e_dst / stage).exists():
                shutil.copytree(e_src / stage, e_dst / stage)
        if same_seeds and (e_src / "splits.csv").is_file() and not (e_dst / "splits.csv").exists():
            shutil.copy2(e_src / "splits.csv", e_dst / "splits.csv")


def run_benchmark(profile: dict[str, Any], *, arms: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                  protocol: str = "default", work: Path | None = None, out_stem: Path | None = None,
                  progress: bool = False, echo: Callable[[str], None] = print, command: str = "") -> dict[str, Any]:
    """Run (or resume) the arms × seeds of `profile`, evaluate, write `<out_stem>.json` and `.md`."""
    t0 = time.time()
    arms = list(arms or profile.get("arms") or ["A", "B", "C", "D", "E"])
    seeds = [int(s) for s in (seeds if seeds is not None else profile.get("seeds", [0, 1, 2]))]
    for a in arms:
        if a not in ARMS:
            raise ConfigError(f"--arms: unknown arm '{a}'; allowed: {', '.join(ARMS)}")
    if protocol == "deitsch":
        bad = [a for a in arms if a not in ("A", "B")]
        if bad:
            raise ConfigError(f"--protocol deitsch has no val split, so it runs arms A and B only, not {bad}")
    name = profile.get("name", "profile")
    suffix = "" if protocol == "default" else f"_{protocol}"
    work = Path(work) if work is not None else RESULTS / "work" / f"efficacy_{name}{suffix}"
    out_stem = Path(out_stem) if out_stem is not None else RESULTS / f"efficacy_{name}{suffix}"
    bench = Bench(profile, work, protocol=protocol, progress=progress, echo=echo)
    if profile.get("reuse") and protocol == "default":
        reuse_work(profile, bench, seeds)
    # seed-major order: every finished seed is a complete comparison if time runs out
    for s in seeds:
        for a in arms:
            bench.run_arm(a, s)
    # the JSON gathers every finished run in the work folder, also those of earlier invocations
    records: dict[str, dict[int, dict]] = {}
    for a in ARMS:
        for s in sorted(int(p.parent.parent.name.split("-")[1]) for p in work.glob(f"seed-*/{a}/result.json")):
            records.setdefault(a, {})[s] = read_json(bench.arm_dir(a, s) / "result.json")
    n_boot = int(profile.get("n_bootstrap", 1000))
    classes = bench.real.classes
    counts = np.bincount(bench.real.y["train"], minlength=len(classes))
    cfg = bench.base
    result: dict[str, Any] = {
        "profile": name, "protocol": protocol, "command": command, "wall_s": round(time.time() - t0, 1),
        "config": config_to_dict(cfg), "classes": classes, "scarcest_class": classes[int(np.argmin(counts))],
        "n_train": int(len(bench.real.y["train"])), "n_val": int(len(bench.real.y["val"])),
        "n_test": int(len(bench.real.y["test"])), "image_size": cfg.data.image_size,
        "val_per_class": _per_class(bench.real.y["val"].tolist(), classes),
        "recipe": {k: getattr(cfg.classifier, k) for k in ("arch", "steps", "batch_size", "lr", "synthetic_share")},
        "test": evaluate(records, bench.real, n_bootstrap=n_boot, split="test"),
        "runs": {a: {str(s): {k: v for k, v in r.items() if not k.endswith("_preds")} for s, r in by.items()}
                 for a, by in records.items()},
        "loop_runs": {a: {str(s): r for s, r in by.items()} for a, by in records.items() if a in LOOP_ARMS},
        "predictions": {a: {str(s): {"val": r.get("val_preds"), "test": r["test_preds"]} for s, r in by.items()}
                        for a, by in records.items()},
        "test_labels": bench.real.y["test"].tolist(),
    }
    for a in result["loop_runs"]:
        for s in result["loop_runs"][a]:
            result["loop_runs"][a][s] = {k: v for k, v in result["loop_runs"][a][s].items() if not k.endswith("_preds")}
    if "val" in bench.real.x:
        result["val"] = evaluate(records, bench.real, n_bootstrap=n_boot, split="val")
    if protocol == "deitsch":
        result["deitsch"] = {**DEITSCH, "note": (
            "Protocol: stratified 75/25 split (our val split is merged into train, so 75% trains), accuracy over "
            "the 4 classes on the 25% test split. What differs from Deitsch et al.: no ImageNet pretraining "
            f"(none is available offline; the model is trained from scratch), {cfg.data.image_size} px instead of "
            f"300 px, a {cfg.classifier.arch} trained for {cfg.classifier.steps} steps on a shared 2-core CPU "
            "instead of a fine-tuned VGG-19 on a GPU, and their split is not ours (per cell, stratified, seed 0).")}
    result["evidence"] = evidence(result) if protocol == "default" else result["deitsch"]["note"]
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_stem.with_suffix(".json"), result)
    atomic_write_text(out_stem.with_suffix(".md"), markdown(result))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="quick", help="a name in benchmarks/efficacy_profiles/ or a YAML path")
    ap.add_argument("--arms", nargs="+", help=f"arms to run (default: the profile's); allowed: {' '.join(ARMS)}")
    ap.add_argument("--seeds", nargs="+", type=int, help="classifier seeds (default: the profile's)")
    ap.add_argument("--protocol", choices=["default", "deitsch"], default="default")
    ap.add_argument("--work", type=Path, help="work folder (default: benchmarks/results/work/efficacy_<profile>)")
    ap.add_argument("--progress", action="store_true", help="show tqdm bars")
    args = ap.parse_args(argv)
    try:
        profile = load_profile(args.profile)
        result = run_benchmark(profile, arms=args.arms, seeds=args.seeds, protocol=args.protocol, work=args.work,
                               progress=args.progress, echo=lambda m: print(m, flush=True),
                               command="python benchmarks/efficacy.py " + " ".join(sys.argv[1:] if argv is None else argv))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
