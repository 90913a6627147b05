"""Efficacy v2 (issue 14): when does targeted synthesis help, and how many real images is a pool worth?

    python benchmarks/efficacy_v2.py                                  # profile v2_full (hours; not run here)
    python benchmarks/efficacy_v2.py --quick                          # digits at 16 px, about a minute
    python benchmarks/efficacy_v2.py --reps 0 1                       # a subset of repetitions (resumable)

Protocol (a learning curve of paired repetitions):
  fractions  each class's train images subsampled to round(f × n) (at least 2), val and test fixed
             (one split, `data.split.seed`); at f = 1.0 every repetition has all train images
  repetition r = subsample draw r × training seed r, the same in every arm
  recipe     a run config (default configs/elpv-cpu.yaml), the same in every arm but for what the arm changes
  generator  one per fraction, trained once on repetition 0's subsample (cache key: the ddpm cache key of
             those pixels, the preset and the generator seed) and judged before any arm: classification
             accuracy score (a classifier trained on its images only, macro-F1 on real val), KID and k-NN
             precision/recall in a label-free (self-supervised, train split only) encoder's space against
             real val, memorisation rate (nearest-train distance ratio). Repetitions r >= 1 use it too, so
             their generator has seen rep 0's subsample: at f < 1 it carries some real images outside
             rep r's fraction (recorded as `generator_shared_from_rep0`).

Arms (all on the config's recipe with natural sampling unless said):
  A   real only                        B   the strongest cheap baseline: balanced sampling or logit-adjusted
  C   E's weak-slice exemplars oversampled (real copies), as many as E added
  D   untargeted class-mode images of the fraction's generator, no filter, no gate, as many as E added
  E   the loop (`run_loop` on the subsample, through `data.split.train_ids`), round 0 = A's model
  R+  as many extra *real* train images as E added, per class, drawn from the train images outside the
      fraction (absent at f = 1.0: there are none), in the same extra batch slots as C and D
  E-nofilter / E-nogate / E-class / E-guided  ablations of E (config overrides, as in efficacy.py)

Inference: per fraction, paired differences per repetition, mean with a t interval over repetitions
(`ci_method`). "Worth N real images": the number of extra real images at which the real-image curve
(A at the fraction, R+, A at larger fractions; averaged over repetitions, made non-decreasing) reaches
the synthetic arm's mean test macro-F1; interval by a bootstrap over repetitions. Test is read once per
trained model (its predictions cached with the model's record); nothing is chosen on test. Every model,
generator and metric is cached under benchmarks/results/work/efficacy_v2/<profile>/ and skipped when present.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from vision_si.classifier import predict, train_classifier
from vision_si.config import apply_overrides, config_to_dict, load_config
from vision_si.data import build_augmentation
from vision_si.errors import ConfigError
from vision_si.generators import GenerationRequest
from vision_si.generators.runner import load_generated, read_manifest, run_generation
from vision_si.metrics import classification_metrics
from vision_si.rundir import atomic_write_json, atomic_write_text, read_json


def _load_v1():
    """benchmarks/efficacy.py (not a package): its profile loader, Real, Bench and arm table are reused."""
    name = "vision_si_benchmark_efficacy"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "efficacy.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


v1 = _load_v1()

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REPO = HERE.parent
ARMS = ("A", "B", "C", "D", "E", "R+", "E-nofilter", "E-nogate", "E-class", "E-guided")
ABLATIONS = ("E-nofilter", "E-nogate", "E-class", "E-guided")
SYNTHETIC_ARMS = ("D", "E", *ABLATIONS)
BASELINES = {"balanced": ["classifier.sampling=balanced"], "logit_adjusted": ["classifier.loss=logit_adjusted"]}
SUBSAMPLE_SEED, EXTRA_SEED = 1414, 2828  # fixed streams of the subsample draws and of R+'s draws
CI_METHOD = ("paired differences per repetition (same subsample and training seed in both arms); mean with a "
             "two-sided 95% Student t interval over repetitions (scipy.stats.t, df = repetitions - 1)")
WORTH_METHOD = ("extra real images at which the real-image curve (A at the fraction, R+, A at larger fractions; "
                "mean over repetitions, made non-decreasing, linear between points) reaches the synthetic arm's "
                "mean test macro-F1; [x, lo, hi], lo/hi the 2.5/97.5 percentiles of a bootstrap over repetitions; "
                "0: the arm gained nothing over A; null: beyond the largest real count measured")


# --------------------------------------------------------------------------- profile


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_profile(name_or_path: str) -> dict[str, Any]:
    """A v2 profile: `config` (a run config, the recipe) with `run` merged over it, `set` overrides on top,
    and the protocol keys (fractions, repetitions, arms, baseline, generator_metrics, encoder)."""
    p = v1.load_profile(name_or_path)
    run = config_to_dict(load_config(p["config"])) if p.get("config") else {}
    run = apply_overrides(_merge(run, p.get("run") or {}), list(p.get("set") or []))
    split = run.setdefault("data", {}).setdefault("split", {})
    if split.get("seed") is None:  # one split for every repetition (the run seed varies with r)
        split["seed"] = int(run.get("seed", 0))
    if run["data"].get("max_per_class") is not None:
        raise ConfigError("data.max_per_class picks images by the run seed, which varies by repetition; "
                          "the learning curve subsamples train itself: leave it out")
    p["run"] = run
    fractions = [float(f) for f in p.setdefault("fractions", [0.1, 0.25, 0.5, 1.0])]
    if not fractions or any(not 0 < f <= 1 for f in fractions) or len(set(fractions)) != len(fractions):
        raise ConfigError(f"fractions: {fractions} must be distinct values in (0, 1]")
    p["fractions"] = sorted(fractions)
    if int(p.setdefault("repetitions", 5)) < 1:
        raise ConfigError(f"repetitions: {p['repetitions']} must be >= 1")
    p.setdefault("arms", list(ARMS))
    check_arms(p["arms"])
    if p.setdefault("baseline", "balanced") not in BASELINES:
        raise ConfigError(f"baseline: '{p['baseline']}' is not one of {', '.join(BASELINES)}")
    p.setdefault("recipe_overrides", ["classifier.sampling=natural"])
    return p


def check_arms(arms: Sequence[str]) -> None:
    for a in arms:
        if a not in ARMS:
            raise ConfigError(f"arms: unknown arm '{a}'; allowed: {', '.join(ARMS)}")


def fkey(f: float) -> str:
    """A fraction as a JSON key and folder name: 0.25, 1.0."""
    return str(float(f))


def subsample(labels: np.ndarray, fraction: float, rep: int) -> np.ndarray:
    """Positions in train kept at `fraction` in repetition `rep`: per class round(f × n), at least 2, sorted."""
    out = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n = len(rows) if fraction >= 1 else min(len(rows), max(2, int(np.floor(fraction * len(rows) + 0.5))))
        out.append(np.random.default_rng([SUBSAMPLE_SEED, rep, int(c)]).permutation(rows)[:n])
    return np.sort(np.concatenate(out))


# --------------------------------------------------------------------------- one cell: (fraction, repetition)


class Cell(v1.Bench):
    """The arms of one fraction and repetition, on a view of the study's real data (`Real.with_train`).

    Reuses efficacy.py's arm machinery (train, loop, oversample, untargeted, records); round 0 of E is A's
    model, R+ is one more extra-images arm, and the generator is the fraction's, shared across repetitions.
    """

    base_arm = "A"
    extra_arms = ("C", "D", "R+")

    def __init__(self, study: Study, fraction: float, rep: int) -> None:
        # not Bench.__init__: the study loads the real data once; a cell sees its subsample of train
        self.study, self.fraction, self.rep = study, fraction, rep
        self.profile, self.progress, self.echo, self.protocol = study.profile, study.progress, study.echo, "default"
        self.work = study.work / f"f{fkey(fraction)}"
        self.gen_cache, self.generator_seed = study.gen_cache, study.generator_seed
        rows = subsample(study.real.y["train"], fraction, rep)
        self.real = study.real.with_train(rows)
        self.left_out = np.setdiff1d(np.arange(len(study.real.y["train"])), rows)
        self.ids_file = self.work / f"seed-{rep}" / "train_ids.txt"
        text = "\n".join(self.real.ids["train"]) + "\n"
        if not self.ids_file.is_file() or self.ids_file.read_text(encoding="utf-8") != text:
            self.ids_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.ids_file, text)
        self.base = self.cfg("A", rep)

    def cfg(self, arm: str, seed: int):
        p = self.profile
        over = [f"seed={seed}", f"name=v2-f{fkey(self.fraction)}-{arm.replace('+', 'plus')}-r{seed}",
                f"generate.cache_dir={self.gen_cache}", f"data.split.train_ids={self.ids_file}",
                *p["recipe_overrides"]]
        if arm == "B":
            over += BASELINES[p["baseline"]]
        over += v1.LOOP_ARMS.get(arm, [])
        return v1.run_config(p, over)

    def share_generator(self, seed: int) -> None:
        """The fraction's generator under the cache key this cell's data and `seed` give (a copy), so the
        loop and arm D load it instead of training one per repetition."""
        shared = self.study.generator_dir(self.fraction)
        alias = self.gen_cache / self.study.generator_key(self.real, self.cfg("E", seed), seed)
        if not alias.exists():
            shutil.copytree(shared, alias)

    def extras(self, arm: str, seed: int) -> tuple[tuple, dict[str, Any]]:
        if arm != "R+":
            return super().extras(arm, seed)
        if not len(self.left_out):
            raise ConfigError(f"R+ at fraction {fkey(self.fraction)}: no train images outside the fraction")
        rows, rule = self.e_additions(self.run_arm("E", seed))
        full = self.study.real
        want = np.bincount([int(r.class_index) for r in rows], minlength=len(full.classes))
        rng = np.random.default_rng([EXTRA_SEED, self.rep])
        picks, shortfall = [], {}
        for c, n in enumerate(want):
            pool = self.left_out[full.y["train"][self.left_out] == c]
            take = rng.permutation(pool)[:n]
            picks += take.tolist()
            if len(take) < n:
                shortfall[full.classes[c]] = int(n - len(take))
        picks = np.asarray(sorted(picks), np.int64)
        info = {"n_extra": int(len(picks)), "extra_rule": f"real train images outside the fraction, per class as {rule}",
                "extra_per_class": v1._per_class(full.y["train"][picks].tolist(), full.classes),
                "extra_shortfall": shortfall, "extra_ids": [full.ids["train"][i] for i in picks]}
        if not len(picks):
            return (None, np.zeros(0, np.int64), []), info
        return (full.x["train"][picks], full.y["train"][picks], info["extra_ids"]), info


# --------------------------------------------------------------------------- the study


class Study:
    """The real data (loaded once), the fraction generators and their metrics, and the cells."""

    def __init__(self, profile: dict[str, Any], work: Path, *, progress: bool = False,
                 echo: Callable[[str], None] = print) -> None:
        self.profile, self.work, self.progress, self.echo = profile, Path(work), progress, echo
        self.gen_cache = self.work / "generators"
        self.generator_seed = int(profile.get("generator_seed", 0))
        self.base = v1.run_config(profile, [f"generate.cache_dir={self.gen_cache}"])
        self.real = v1.Real(self.base)
        self.classes = self.real.classes
        counts = np.bincount(self.real.y["train"], minlength=len(self.classes))
        self.scarcest = int(np.argmin(counts))
        self._cells: dict[tuple[float, int], Cell] = {}
        self._encoder = None

    def cell(self, fraction: float, rep: int) -> Cell:
        if (fraction, rep) not in self._cells:
            self._cells[(fraction, rep)] = Cell(self, fraction, rep)
        return self._cells[(fraction, rep)]

    def arms_at(self, fraction: float, arms: Sequence[str]) -> list[str]:
        """R+ needs train images outside the fraction: none at 1.0."""
        return [a for a in arms if not (a == "R+" and fraction >= 1)]

    # ------------------------------------------------------------------ the generators
    def generator_key(self, real: Any, cfg: Any, seed: int) -> str:
        from vision_si.generators import create_generator, resolve_preset
        from vision_si.generators.ddpm import cache_key
        from vision_si.generators.presets import generator_kwargs

        preset = resolve_preset(cfg.generate)
        if preset["backend"] != "ddpm":
            raise ConfigError(f"generate.preset: efficacy v2 trains its generators itself (ddpm); got backend "
                              f"'{preset['backend']}'")
        settings = create_generator(preset["backend"], **generator_kwargs(preset)).settings()
        train_seed = seed if cfg.generate.train_seed is None else cfg.generate.train_seed
        return cache_key(real.x["train"], real.y["train"], real.classes, settings, train_seed)

    def generator_dir(self, fraction: float) -> Path:
        """The fraction's generator, trained once on repetition 0's subsample with `generator_seed`."""
        from vision_si.generators.runner import fit_generator

        cell = self.cell(fraction, 0)
        cfg = cell.cfg("E", self.generator_seed)
        path = self.gen_cache / self.generator_key(cell.real, cfg, self.generator_seed)
        if not (path / "meta.json").is_file():
            self.echo(f"fraction {fkey(fraction)}: training its generator")
            fit_generator(cfg.generate, cell.real.split("train"), self.classes, seed=self.generator_seed,
                          progress=self.progress)
        return path

    def encoder(self):
        """A self-supervised encoder on the whole train split (never val/test), for label-free metrics."""
        if self._encoder is None:
            from vision_si.pretrain import pretrain_encoder

            over = [f"pretrain.{k}={json.dumps(v)}" for k, v in (self.profile.get("encoder") or {}).items()]
            cfg = v1.run_config(self.profile, [f"pretrain.cache_dir={self.work / 'encoders'}", *over])
            r = self.real
            self._encoder = pretrain_encoder(
                cfg.pretrain, r.x["train"], r.ids["train"], [r.table.sha256[i] for i in r.index["train"]],
                arch=cfg.classifier.arch, model_kwargs=cfg.classifier.model_kwargs, seed=self.generator_seed,
                forbidden_ids=r.ids["val"] + r.ids["test"],
                forbidden_sha256=[r.table.sha256[i] for s in ("val", "test") for i in r.index[s]],
                progress=self.progress, device=cfg.classifier.device)
        return self._encoder

    def judge_generator(self, fraction: float) -> dict[str, Any]:
        """CAS, KID, precision/recall and memorisation rate of the fraction's generator, cached in a folder
        named by the generator's cache key (another preset or subsample is judged anew)."""
        cell = self.cell(fraction, 0)
        cfg = cell.cfg("D", self.generator_seed)
        key = self.generator_key(cell.real, cfg, self.generator_seed)
        out = self.work / f"f{fkey(fraction)}" / f"generator-{key[:16]}"
        done = out / "metrics.json"
        if done.is_file():
            return read_json(done)
        t0 = time.time()
        gm = self.profile.get("generator_metrics") or {}
        path = self.generator_dir(fraction)
        gen_cfg = cfg.generate
        gen_cfg.mode = "class"
        counts = np.bincount(cell.real.y["train"], minlength=len(self.classes))
        cap = gm.get("max_per_class")
        counts = np.minimum(counts, cap) if cap else counts
        requests = [GenerationRequest(class_index=c, class_name=self.classes[c], slice_id="cas", count=int(n),
                                      mode="class", strength=gen_cfg.strength) for c, n in enumerate(counts) if n]
        res = run_generation(gen_cfg, requests, train=cell.real.split("train"), classes=self.classes,
                             out_dir=out / "generate", seed=self.generator_seed, id_prefix="syn-cas",
                             classifier_fn=None, progress=self.progress)
        syn = load_generated(out / "generate", res.rows, cfg.data, channels=self.real.channels)
        syn_y = np.asarray([row.class_index for row in res.rows], np.int64)
        # classification accuracy score: trained on synthetic images only, judged on real val
        vx, vy = self.real.val()
        clf = train_classifier(cfg.classifier, syn, syn_y, classes=self.classes, seed=self.generator_seed,
                               out_dir=out / "cas_model", augment=build_augmentation(cfg.data.augment,
                                                                                       self.real.channels, 0),
                               progress=self.progress)
        cas = classification_metrics(vy, predict(clf, vx).probs.argmax(1), self.classes)["macro_f1"]
        enc = self.encoder()
        real_emb, syn_emb = enc.embed(vx), enc.embed(syn)
        kid_mean, kid_std = kid(real_emb, syn_emb, subsets=int(gm.get("kid_subsets", 50)),
                                subset_size=int(gm.get("kid_subset_size", 1000)), seed=0)
        prec, rec = precision_recall(real_emb, syn_emb, k=int(gm.get("pr_k", 3)))
        threshold = float(gm.get("memorisation_threshold", 1 / 3))
        from vision_si.similarity import pixel_vectors

        size = min(16, int(self.real.x["train"].shape[-1]))
        mem = memorisation_rate(pixel_vectors(syn, size), pixel_vectors(cell.real.x["train"], size), threshold)
        metrics = {"fraction": fraction, "preset": cfg.generate.preset, "cas_val_macro_f1": float(cas), "kid": kid_mean, "kid_std": kid_std, "precision": prec,
                   "recall": rec, "memorisation_rate": mem, "memorisation_threshold": threshold,
                   "n_synthetic": int(len(syn_y)), "n_train_generator": int(len(cell.real.y["train"])),
                   "generator": path.name, "generator_sha256": res.generator_sha256,
                   "encoder": str(enc.path), "embedding_reference": "real val",
                   "memorisation_space": f"pixel correlation at {size} px (vision_si.similarity.pixel_vectors)",
                   "seconds": round(time.time() - t0, 1)}
        atomic_write_json(done, metrics)
        return metrics


# --------------------------------------------------------------------------- generator metrics (plain arrays)


def kid(real: np.ndarray, fake: np.ndarray, *, subsets: int, subset_size: int, seed: int) -> tuple[float, float]:
    """Kernel inception distance (Binkowski et al. 2018) on embeddings: the unbiased MMD² with the cubic
    polynomial kernel (x·y/d + 1)³, averaged over random subsets; (mean, std over subsets)."""
    from sklearn.metrics.pairwise import polynomial_kernel

    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError(f"KID needs at least 2 images a side, got {len(real)} real and {len(fake)} synthetic")
    rng = np.random.default_rng(seed)
    kw = {"degree": 3, "gamma": 1.0 / real.shape[1], "coef0": 1.0}
    vals = []
    for _ in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = fake[rng.choice(len(fake), m, replace=False)]
        kxx, kyy, kxy = polynomial_kernel(x, **kw), polynomial_kernel(y, **kw), polynomial_kernel(x, y, **kw)
        vals.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): the share of synthetic embeddings inside
    some real embedding's k-NN ball, and of real ones inside some synthetic one's."""
    from sklearn.metrics import pairwise_distances

    def radii(x: np.ndarray) -> np.ndarray:
        d = pairwise_distances(x)
        return np.sort(d, axis=1)[:, min(k, len(x) - 1)]

    d = pairwise_distances(fake, real)
    precision = float((d <= radii(real)[None, :]).any(axis=1).mean())
    recall = float((radii(fake)[None, :] >= d.T).any(axis=1).mean())
    return precision, recall


def memorisation_rate(fake: np.ndarray, train: np.ndarray, threshold: float) -> float:
    """Share of synthetic images whose distance to the nearest training image is below `threshold` times
    the distance to the second nearest (Yoon et al. 2023 use 1/3): a near-copy of one training image."""
    from sklearn.neighbors import NearestNeighbors

    if len(train) < 2:
        raise ValueError("the memorisation rate needs at least 2 training images")
    d, _ = NearestNeighbors(n_neighbors=2).fit(train).kneighbors(fake)
    return float((d[:, 0] < threshold * d[:, 1]).mean())


# --------------------------------------------------------------------------- statistics


def t_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, list[float | None]]:
    """Mean of paired differences and its t interval over repetitions ([None, None] with one repetition)."""
    d = np.asarray(diffs, float)
    if len(d) < 2:
        return float(d.mean()), [None, None]
    half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return float(d.mean()), [float(d.mean() - half), float(d.mean() + half)]


def invert_curve(xs: np.ndarray, ys: np.ndarray, target: float) -> float:
    """The x at which the non-decreasing envelope of (xs, ys) reaches `target` (linear between points);
    0 when the first point is already there, inf when no point is."""
    order = np.argsort(xs, kind="stable")
    xs, ys = np.asarray(xs, float)[order], np.maximum.accumulate(np.asarray(ys, float)[order])
    if target <= ys[0]:
        return 0.0
    if target > ys[-1]:
        return float("inf")
    k = int(np.searchsorted(ys, target))  # ys[k-1] < target <= ys[k]
    return float(xs[k - 1] + (target - ys[k - 1]) / (ys[k] - ys[k - 1]) * (xs[k] - xs[k - 1]))


def worth_real_images(points: list[tuple[np.ndarray, np.ndarray]], synthetic: np.ndarray, *, n_bootstrap: int,
                      seed: int = 0) -> list[float | None]:
    """[x, lo, hi] extra real images worth the synthetic arm (see WORTH_METHOD).

    `points`: the real-image curve, each point (extra real images per repetition, macro-F1 per repetition),
    the first one A at the fraction (0 extra); `synthetic`: the arm's macro-F1 per repetition.
    """
    def one(idx: np.ndarray) -> float:
        xs = np.array([p[0][idx].mean() for p in points])
        ys = np.array([p[1][idx].mean() for p in points])
        return invert_curve(xs, ys, float(synthetic[idx].mean()))

    n = len(synthetic)
    x = one(np.arange(n))
    rng = np.random.default_rng(seed)
    boot = np.array([one(rng.integers(0, n, n)) for _ in range(n_bootstrap)])
    lo, hi = np.percentile(boot, 2.5, method="lower"), np.percentile(boot, 97.5, method="higher")
    return [None if not np.isfinite(v) else round(float(v), 1) for v in (x, lo, hi)]


# --------------------------------------------------------------------------- driver


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None, "commit_dirty": bool(git("status", "--porcelain"))}


def run_study(profile: dict[str, Any], *, arms: Sequence[str] | None = None, reps: Sequence[int] | None = None,
              work: Path | None = None, out_stem: Path | None = None, progress: bool = False,
              echo: Callable[[str], None] = print, command: str = "") -> dict[str, Any]:
    """Judge the generators, run (or resume) every cell's arms, write `<out_stem>.json`, `.md` and `.png`."""
    t0 = time.time()
    arms = list(arms or profile["arms"])
    check_arms(arms)
    reps = list(range(int(profile["repetitions"]))) if reps is None else [int(r) for r in reps]
    name = profile.get("name", "profile")
    work = Path(work) if work is not None else RESULTS / "work" / "efficacy_v2" / name
    out_stem = Path(out_stem) if out_stem is not None else RESULTS / ("efficacy_v2" if name == "v2_full"
                                                                      else f"efficacy_{name}")
    guard_work_folder(profile, work)
    study = Study(profile, work, progress=progress, echo=echo)
    fractions = profile["fractions"]
    generator = {fkey(f): study.judge_generator(f) for f in fractions}  # before any arm
    for r in reps:  # repetition-major: every finished repetition is a complete set of paired comparisons
        for f in fractions:
            cell = study.cell(f, r)
            for a in study.arms_at(f, arms):
                cell.run_arm(a, r)
    result = collect(study, arms=[a for a in ARMS if a in arms or a == "A"], generator=generator)
    result.update({"profile": name, "command": command, "wall_s": round(time.time() - t0, 1), "work": str(work),
                   "config": config_to_dict(study.base)})
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_stem.with_suffix(".json"), result)
    atomic_write_text(out_stem.with_suffix(".md"), markdown(result))
    plot_learning_curve(result, out_stem.with_suffix(".png"))
    return result


def guard_work_folder(profile: dict[str, Any], work: Path) -> None:
    """A work folder holds the products of one profile (arms and repetitions may grow): cached results of
    another recipe would be reused silently, so a folder made with other settings is refused."""
    settings = {k: v for k, v in profile.items() if k not in ("arms", "name")}
    record = Path(work) / "profile.json"
    if record.is_file():
        if read_json(record) != json.loads(json.dumps(settings)):
            raise ConfigError(f"work folder '{work}' was made with other profile settings ({record}); "
                              "pass another --work or delete the folder")
        return
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, settings)


def collect(study: Study, *, arms: Sequence[str], generator: dict[str, Any]) -> dict[str, Any]:
    """The result from the cached records of every finished (arm, fraction, repetition) in the work folder."""
    fractions, classes, real = study.profile["fractions"], study.classes, study.real
    y = real.y["test"]
    n_reps = int(study.profile["repetitions"])
    table: dict[str, dict[str, Any]] = {}
    for a in arms:
        for f in fractions:
            entry: dict[str, list] = {"repetitions": [], "test_macro_f1": [], "scarcest_recall": [], "n_extra": []}
            for r in range(n_reps):
                path = study.work / f"f{fkey(f)}" / f"seed-{r}" / a / "result.json"
                if not path.is_file():
                    continue
                rec = read_json(path)
                m = classification_metrics(y, np.asarray(rec["test_preds"]), classes)
                entry["repetitions"].append(r)
                entry["test_macro_f1"].append(float(m["macro_f1"]))
                entry["scarcest_recall"].append(float(m["per_class"][classes[study.scarcest]]["recall"]))
                entry["n_extra"].append(int(rec.get("n_extra") or rec.get("n_synthetic_in_training") or 0))
            if entry["repetitions"]:
                table.setdefault(a, {})[fkey(f)] = entry
    comparisons = []
    pairs = [(a, "A") for a in arms if a != "A"] + [(a, "B") for a in arms if a not in ("A", "B")]
    pairs += [("E", o) for o in ("C", "D", "R+")] + [(a, "E") for a in ABLATIONS]
    for a, b in pairs:
        for f in fractions:
            ea, eb = table.get(a, {}).get(fkey(f)), table.get(b, {}).get(fkey(f))
            if not ea or not eb:
                continue
            common = sorted(set(ea["repetitions"]) & set(eb["repetitions"]))
            if not common:
                continue
            da = [ea["test_macro_f1"][ea["repetitions"].index(r)] - eb["test_macro_f1"][eb["repetitions"].index(r)]
                  for r in common]
            dr = [ea["scarcest_recall"][ea["repetitions"].index(r)] - eb["scarcest_recall"][eb["repetitions"].index(r)]
                  for r in common]
            delta, ci = t_interval(da)
            rdelta, rci = t_interval(dr)
            comparisons.append({"arm": a, "vs": b, "fraction": fkey(f), "metric": "test_macro_f1", "delta": delta,
                                "ci": ci, "per_repetition": da, "repetitions": common,
                                "scarcest_recall_delta": rdelta, "scarcest_recall_ci": rci})
    n_train = {fkey(f): int(len(study.cell(f, 0).real.y["train"])) for f in fractions}
    worth: dict[str, dict[str, Any]] = {}
    n_boot = int(study.profile.get("n_bootstrap", 2000))
    for a in SYNTHETIC_ARMS:
        for i, f in enumerate(fractions):
            s, base, rplus = (table.get(k, {}).get(fkey(f)) for k in (a, "A", "R+"))
            if not s or not base:
                continue
            later = [(g, table.get("A", {}).get(fkey(g))) for g in fractions[i + 1:]]
            curves = [("A", 0, base)] + ([("R+", None, rplus)] if rplus else [])
            curves += [("A", n_train[fkey(g)] - n_train[fkey(f)], e) for g, e in later if e]
            common = sorted(set(s["repetitions"]).intersection(*(set(e["repetitions"]) for _, _, e in curves)))
            if len(curves) < 2 or not common:
                continue
            points = []
            for _, extra, e in curves:
                at = [e["repetitions"].index(r) for r in common]
                xs = np.array([e["n_extra"][j] if extra is None else extra for j in at], float)
                points.append((xs, np.array([e["test_macro_f1"][j] for j in at])))
            syn = np.array([s["test_macro_f1"][s["repetitions"].index(r)] for r in common])
            worth.setdefault(a, {})[fkey(f)] = worth_real_images(points, syn, n_bootstrap=n_boot)
    return {
        **git_commit(), "fractions": [float(f) for f in fractions], "repetitions": n_reps, "ci_method": CI_METHOD,
        "worth_method": WORTH_METHOD, "classes": classes, "scarcest_class": classes[study.scarcest],
        "n_train": n_train, "n_val": int(len(real.y["val"])), "n_test": int(len(y)),
        "baseline": study.profile["baseline"], "generator": generator, "arms": table, "comparisons": comparisons,
        "worth_real_images": worth, "absent": [{"arm": "R+", "fraction": fkey(f), "reason": "no train images outside "
                                                "the fraction"} for f in fractions if f >= 1],
        "generator_shared_from_rep0": True, "synthetic_in_eval_splits": synthetic_in_eval(study),
        "test_labels": y.tolist(),
    }


def synthetic_in_eval(study: Study) -> int:
    """Synthetic images (any manifest in the work folder) whose id or sha256 is a val/test image's: must be 0."""
    r = study.real
    ids = set(r.ids["val"]) | set(r.ids["test"])
    shas = {r.table.sha256[i] for s in ("val", "test") for i in r.index[s]}
    return sum(1 for m in study.work.rglob("manifest.jsonl") for row in read_manifest(m)
               if row.id in ids or row.sha256 in shas)


# --------------------------------------------------------------------------- report


def _ci(ci: Sequence[float | None]) -> str:
    return "—" if ci[0] is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def markdown(res: dict[str, Any]) -> str:
    md = [f"# Efficacy v2: profile `{res['profile']}`", "",
          f"Commit `{res['commit']}`{' (uncommitted changes)' if res['commit_dirty'] else ''}; command "
          f"`{res['command']}`; wall time of this invocation {res['wall_s'] / 60:.1f} min.  ",
          f"Fractions {', '.join(fkey(f) for f in res['fractions'])} of each class's train images "
          f"(train images: {', '.join(f'{k}: {v}' for k, v in res['n_train'].items())}); val {res['n_val']}, test "
          f"{res['n_test']} (fixed); {res['repetitions']} paired repetitions; B = {res['baseline']}; scarcest class "
          f"`{res['scarcest_class']}`.  ", f"Intervals: {res['ci_method']}.", "",
          "## Generators (judged before any arm; real val and the train split only)", "",
          "| fraction | CAS val macro-F1 | KID (± sd) | precision | recall | memorisation rate | images |",
          "|---|---|---|---|---|---|---|"]
    for f, g in res["generator"].items():
        md.append(f"| {f} | {g['cas_val_macro_f1']:.3f} | {g['kid']:.4f} ± {g['kid_std']:.4f} | {g['precision']:.3f} "
                  f"| {g['recall']:.3f} | {g['memorisation_rate']:.3f} | {g['n_synthetic']} |")
    md += ["", "## Test macro-F1 (mean over repetitions) and paired differences", "",
           "| fraction | arm | reps | macro-F1 | scarcest recall | extra images | Δ vs A [95% t CI] | Δ vs B [95% t CI] |",
           "|---|---|---|---|---|---|---|---|"]
    comp = {(c["arm"], c["vs"], c["fraction"]): c for c in res["comparisons"]}
    for f in (fkey(x) for x in res["fractions"]):
        for a, by_f in res["arms"].items():
            e = by_f.get(f)
            if not e:
                continue
            cells = []
            for vs in ("A", "B"):
                c = comp.get((a, vs, f))
                cells.append(f"{c['delta']:+.3f} {_ci(c['ci'])}" if c else "")
            md.append(f"| {f} | {a} | {len(e['repetitions'])} | {np.mean(e['test_macro_f1']):.3f} | "
                      f"{np.mean(e['scarcest_recall']):.3f} | {np.mean(e['n_extra']):.0f} | {cells[0]} | {cells[1]} |")
    for a in res["absent"]:
        md.append(f"\n{a['arm']} is absent at fraction {a['fraction']}: {a['reason']}.")
    md += ["", "## Worth in real images", "", res["worth_method"] + ".", "", "| arm | fraction | x [lo, hi] |",
           "|---|---|---|"]
    for a, by_f in res["worth_real_images"].items():
        for f, (x, lo, hi) in by_f.items():
            show = ["beyond" if v is None else f"{v:.0f}" for v in (x, lo, hi)]
            md.append(f"| {a} | {f} | {show[0]} [{show[1]}, {show[2]}] |")
    md += ["", f"Synthetic images whose id or sha256 is a val/test image's: {res['synthetic_in_eval_splits']}.",
           "Repetitions >= 1 use the fraction's generator trained on repetition 0's subsample "
           "(`generator_shared_from_rep0`)."]
    return "\n".join(md) + "\n"


def plot_learning_curve(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (a, by_f) in enumerate(res["arms"].items()):
        fs = [f for f in (fkey(x) for x in res["fractions"]) if f in by_f]
        nudge = 1 + 0.012 * (i - len(res["arms"]) / 2)  # arms with equal scores (E refused = A) stay visible
        xs = [(res["n_train"][f] + (np.mean(by_f[f]["n_extra"]) if a == "R+" else 0)) * nudge for f in fs]
        ys = [np.mean(by_f[f]["test_macro_f1"]) for f in fs]
        sd = [np.std(by_f[f]["test_macro_f1"], ddof=1) if len(by_f[f]["test_macro_f1"]) > 1 else 0 for f in fs]
        ax.errorbar(xs, ys, yerr=sd, marker="o", capsize=3, label=a, linestyle="-" if a != "R+" else ":")
    ax.set_xscale("log")
    ax.set_xlabel("real training images (R+: with its extra real images; arms nudged apart)")
    ax.set_ylabel("test macro-F1 (mean ± sd over repetitions)")
    ax.set_title(f"Efficacy v2 learning curve ({res['profile']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="v2_full", help="a name in benchmarks/efficacy_profiles/ or a YAML path")
    ap.add_argument("--quick", action="store_true", help="the v2_quick profile (digits, 16 px, a minute or two)")
    ap.add_argument("--arms", nargs="+", help=f"arms (default: the profile's); allowed: {' '.join(ARMS)}")
    ap.add_argument("--reps", nargs="+", type=int, help="repetitions to run now (default: all); others resume later")
    ap.add_argument("--work", type=Path, help="work folder (default: results/work/efficacy_v2/<profile>)")
    ap.add_argument("--out", type=Path, help="output stem (default: results/efficacy_v2 for v2_full)")
    ap.add_argument("--progress", action="store_true", help="show tqdm bars")
    args = ap.parse_args(argv)
    try:
        profile = load_profile("v2_quick" if args.quick else args.profile)
        result = run_study(profile, arms=args.arms, reps=args.reps, work=args.work, out_stem=args.out,
                           progress=args.progress, echo=lambda m: print(m, flush=True),
                           command="python benchmarks/efficacy_v2.py " + " ".join(sys.argv[1:] if argv is None else argv))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
