"""The gate's statistics on plain arrays: calibration, paired metrics, seed-level intervals, sequential looks.

Everything here takes predicted log-probabilities (seeds × N × K) and labels, so any model plugs in.

- **Calibration** (`fit_calibration`): a temperature and a class bias fitted by maximum likelihood on
  the *selection* images, the same procedure for both sides of a comparison. Argmax decisions are
  then taken for a balanced prior (`balanced_predictions`), so a pool that only moves the decision
  boundary between two classes (a shifted prior) gains nothing after calibration.
- **Metrics** (`metric_value`): `macro_auroc` (one-vs-rest, averaged over classes), `log_loss`
  (after calibration; lower is better, its improvement is reported as `before - after`),
  `macro_f1` and `balanced_accuracy` (on balanced calibrated decisions). `improvement` is always
  signed so that a positive value means the candidate is better.
- **Paired interval over seeds** (`paired_interval`): seed s of both sides trained with the same
  seed and the same real batches; d_s is the improvement of pair s on the judging images. The
  interval is d̄ ± t(df) · sqrt(s_d² / S + v_img), where s_d² is the variance of d_s between
  seeds (training noise) and v_img the variance of d̄ over a paired bootstrap of the judging images
  (the images are a sample too). The degrees of freedom are Welch–Satterthwaite's: S − 1 when
  training noise dominates, more when the (well estimated) image part does. With one seed there is
  no estimate of training noise: the interval is then over images only and says so.
- **Sequential looks** (`sequential_levels`): seeds come in batches; after each batch the gate may
  stop. The one-sided error α is spent over the looks with the Lan–DeMets O'Brien–Fleming spending
  function α(t) = 2 − 2Φ(z_{1−α/2} / √t), t = seeds so far / `max_seeds`, so early looks stop only on
  overwhelming evidence and the last look keeps nearly the whole α. The boundaries are computed once
  from the design (looks and α), before any number is seen, and turned into a nominal one-sided
  level per look; the interval at a look uses that level.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import optimize, special, stats

METRICS = ("macro_auroc", "log_loss", "macro_f1", "balanced_accuracy")
LOWER_IS_BETTER = {"log_loss"}


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    """log p' = log_softmax(log p / temperature + bias), fitted on the selection images."""

    temperature: float
    bias: np.ndarray

    def apply(self, log_probs: np.ndarray) -> np.ndarray:
        z = np.asarray(log_probs, dtype=np.float64) / self.temperature + self.bias
        return z - special.logsumexp(z, axis=-1, keepdims=True)

    def to_dict(self) -> dict:
        return {"temperature": float(self.temperature), "bias": [float(b) for b in self.bias]}


def fit_calibration(log_probs: np.ndarray, labels: np.ndarray) -> Calibration:
    """Temperature and class bias (sum zero) that minimise the log loss of `labels` (maximum likelihood)."""
    lp = np.asarray(log_probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    n, k = lp.shape
    if n == 0:
        return Calibration(1.0, np.zeros(k))

    def nll(theta: np.ndarray) -> float:
        t = np.exp(theta[0])
        bias = np.r_[theta[1:], -theta[1:].sum()]
        z = lp / t + bias
        return float(-(z[np.arange(n), y] - special.logsumexp(z, axis=1)).mean() + 1e-4 * (bias ** 2).sum())

    res = optimize.minimize(nll, np.zeros(k), method="L-BFGS-B",
                            bounds=[(np.log(0.05), np.log(20.0))] + [(-10.0, 10.0)] * (k - 1))
    theta = res.x
    return Calibration(float(np.exp(theta[0])), np.r_[theta[1:], -theta[1:].sum()])


def balanced_predictions(cal_log_probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Argmax for equal class priors: log p − log prior (the Bayes rule for balanced error)."""
    return np.argmax(np.asarray(cal_log_probs) - np.log(np.maximum(prior, 1e-12)), axis=-1)


# --------------------------------------------------------------------------- metrics


def _macro_auroc_batch(labels: np.ndarray, probs: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Macro one-vs-rest AUROC on each resample (rows of `idx`), by ranks (Mann–Whitney U), ties averaged."""
    y = labels[idx]  # B×n
    out = np.zeros(idx.shape[0])
    used = np.zeros(idx.shape[0])
    for c in range(probs.shape[1]):
        s = probs[idx, c]  # B×n
        ranks = stats.rankdata(s, axis=1)
        pos = y == c
        n_pos = pos.sum(axis=1)
        n_neg = y.shape[1] - n_pos
        ok = (n_pos > 0) & (n_neg > 0)
        u = (ranks * pos).sum(axis=1) - n_pos * (n_pos + 1) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            auc = np.where(ok, u / np.maximum(n_pos * n_neg, 1), 0.0)
        out += auc
        used += ok
    return out / np.maximum(used, 1)


def metric_batch(metric: str, labels: np.ndarray, cal_log_probs: np.ndarray, prior: np.ndarray,
                 idx: np.ndarray) -> np.ndarray:
    """`metric` on each resample of the images given by `idx` (B×n indices), for one model."""
    labels = np.asarray(labels, dtype=np.int64)
    if metric == "macro_auroc":
        return _macro_auroc_batch(labels, np.exp(cal_log_probs), idx)
    if metric == "log_loss":
        return -cal_log_probs[np.arange(labels.size), labels][idx].mean(axis=1)
    if metric in ("macro_f1", "balanced_accuracy"):
        from vision_si.metrics import metric_samples

        preds = balanced_predictions(cal_log_probs, prior)
        return metric_samples(labels, preds, cal_log_probs.shape[1], idx, metric)
    raise ValueError(f"unknown gate metric {metric!r}; allowed: {', '.join(METRICS)}")


def metric_value(metric: str, labels: np.ndarray, cal_log_probs: np.ndarray, prior: np.ndarray) -> float:
    return float(metric_batch(metric, labels, cal_log_probs, prior, np.arange(len(labels))[None, :])[0])


def improvement(metric: str, before: np.ndarray | float, after: np.ndarray | float):
    """after − before, or before − after for a metric where lower is better: positive = candidate better."""
    return (np.asarray(before) - np.asarray(after)) if metric in LOWER_IS_BETTER else (
        np.asarray(after) - np.asarray(before))


# --------------------------------------------------------------------------- intervals


@dataclass(frozen=True)
class PairedInterval:
    delta: float  # mean improvement over seeds (positive: candidate better)
    lower: float
    upper: float
    per_seed: list[float]
    seed_sd: float | None  # between-seed standard deviation of the paired improvements
    image_se: float  # bootstrap standard error of the seed-mean improvement over images
    df: float
    level: float  # two-sided coverage of [lower, upper]
    method: str


def paired_interval(metric: str, labels: np.ndarray, before: np.ndarray, after: np.ndarray, prior: np.ndarray, *,
                    one_sided_alpha: float, n_bootstrap: int = 1000, seed: int = 0) -> PairedInterval:
    """Interval of the seed-mean improvement (module doc). `before`/`after`: S×N×K calibrated log-probs."""
    labels = np.asarray(labels, dtype=np.int64)
    s = before.shape[0]
    full = np.arange(labels.size)[None, :]
    d = np.array([float(improvement(metric, metric_batch(metric, labels, b, prior, full)[0],
                                    metric_batch(metric, labels, a, prior, full)[0]))
                  for b, a in zip(before, after, strict=True)])
    idx = np.random.default_rng(seed).integers(0, labels.size, size=(n_bootstrap, labels.size))
    boot = np.mean([improvement(metric, metric_batch(metric, labels, b, prior, idx), metric_batch(metric, labels, a, prior, idx))
                    for b, a in zip(before, after, strict=True)], axis=0)
    image_var = float(np.var(boot, ddof=1))
    if s > 1:
        seed_sd = float(np.std(d, ddof=1))
        seed_var = seed_sd ** 2 / s
        se = float(np.sqrt(seed_var + image_var))
        # Welch-Satterthwaite, the image part counted with the bootstrap's many degrees of freedom
        denom = seed_var ** 2 / (s - 1) + image_var ** 2 / (n_bootstrap - 1)
        df = float(min((seed_var + image_var) ** 2 / denom, 1e6)) if denom > 0 else 1e6
        q = float(stats.t.ppf(1 - one_sided_alpha, df))
        method = (f"t-interval over {s} paired seeds with the image-bootstrap variance of the seed mean added "
                  f"({n_bootstrap} paired resamples of {labels.size} judging images; Welch-Satterthwaite df {df:.1f})")
    else:
        seed_sd, se, df = None, float(np.sqrt(image_var)), float("inf")
        q = float(stats.norm.ppf(1 - one_sided_alpha))
        method = (f"normal interval over a paired bootstrap of {labels.size} judging images, one seed: "
                  "training noise not estimated")
    mean = float(d.mean())
    return PairedInterval(mean, mean - q * se, mean + q * se, [float(v) for v in d], seed_sd, float(np.sqrt(image_var)),
                          df, 1 - 2 * one_sided_alpha, method)


# --------------------------------------------------------------------------- sequential design


@lru_cache(maxsize=64)
def sequential_levels(looks: tuple[int, ...], one_sided_alpha: float, simulations: int = 400_000) -> tuple[float, ...]:
    """Nominal one-sided level per look for seed counts `looks` (O'Brien–Fleming-type spending, module doc).

    The boundaries on the z scale are found look by look so that the probability of first crossing
    at look j under no effect equals the α spent between looks j−1 and j; the joint law of the
    statistics (correlation sqrt(n_i / n_j)) is simulated once with a fixed seed, so the design is
    the same on every call.
    """
    n = np.asarray(looks, dtype=float)
    if len(n) == 0 or np.any(np.diff(n) <= 0) or n[0] < 1:
        raise ValueError(f"looks must be increasing seed counts >= 1, got {looks}")
    if len(n) == 1:
        return (float(one_sided_alpha),)
    t = n / n[-1]
    z_half = stats.norm.ppf(1 - one_sided_alpha / 2)
    spent = 2 - 2 * stats.norm.cdf(z_half / np.sqrt(t))
    rng = np.random.default_rng(20261201)
    increments = rng.standard_normal((simulations, len(n))) * np.sqrt(np.diff(np.r_[0, n]))
    z = np.cumsum(increments, axis=1) / np.sqrt(n)  # the standardised statistic at each look
    alive = np.ones(simulations, dtype=bool)
    levels = []
    for j in range(len(n)):
        target = spent[j] - (spent[j - 1] if j else 0.0)
        zj = np.sort(z[alive, j])[::-1]
        m = int(round(target * simulations))
        c = float(zj[m - 1]) if m >= 1 else float(zj[0]) + 1.0
        levels.append(float(1 - stats.norm.cdf(c)))
        alive &= z[:, j] < c
    return tuple(levels)
