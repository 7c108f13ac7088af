"""Confidence intervals and paired tests for reported metrics.

- :func:`bootstrap_ci`: the percentile bootstrap (Efron & Tibshirani 1993, ch. 13) over *patients*: each
  resample draws patients with replacement and keeps all their bags, so slides of one patient never
  count as independent evidence (the unit Patho-Bench resamples too). Resamples on which the metric is
  undefined (e.g. one class only) are skipped and counted. Seeded: the same inputs give the same interval.
- :func:`delong_test`: DeLong, DeLong & Clarke-Pearson (1988), "Comparing the areas under two or more
  correlated ROC curves", for two scores of the same cases. With X the positives' and Y the negatives'
  scores, each AUROC is the Mann-Whitney statistic theta = 1/(m n) sum_i sum_j psi(X_i, Y_j), psi = 1 if
  X > Y, 1/2 if equal, 0 otherwise. The structural components V10_i = 1/n sum_j psi(X_i, Y_j) and
  V01_j = 1/m sum_i psi(X_i, Y_j) give the covariance S = S10 / m + S01 / n (S10, S01 the sample
  covariance matrices of the components across the two scores); z = (theta_1 - theta_2) / sqrt(var_1 +
  var_2 - 2 cov_12), two-sided p from the normal. The components are computed from midranks (Sun & Xu
  2014, "Fast implementation of DeLong's algorithm"), in O((m + n) log(m + n)).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.stats import norm, rankdata


def bootstrap_ci(metric: Callable[[np.ndarray], float], groups: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict:
    """``metric(indices)`` on the data, and its percentile interval over ``n_boot`` resamples of the
    groups (patients). Returns ``{"value", "low", "high", "n_boot", "n_undefined"}``."""
    groups = np.asarray(groups)
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    rng = np.random.default_rng(seed)
    value = float(metric(np.arange(len(groups))))
    stats = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(uniq), len(uniq))
        v = float(metric(np.concatenate([members[g] for g in pick])))
        if math.isfinite(v):
            stats.append(v)
    alpha = (1 - level) / 2
    low, high = (np.quantile(stats, [alpha, 1 - alpha]) if stats else (math.nan, math.nan))
    return {"value": value, "low": float(low), "high": float(high), "n_boot": n_boot,
            "n_undefined": n_boot - len(stats)}


def _components(positives: np.ndarray, negatives: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUROC and its structural components V10 (per positive) and V01 (per negative), from midranks."""
    m, n = len(positives), len(negatives)
    both = rankdata(np.concatenate([positives, negatives]))
    tx, ty = rankdata(positives), rankdata(negatives)
    v10 = (both[:m] - tx) / n  # how many negatives each positive beats (ties half)
    v01 = 1.0 - (both[m:] - ty) / m  # how many positives beat each negative
    return float(v10.mean()), v10, v01


def delong_test(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> dict:
    """DeLong's test of AUROC(a) = AUROC(b) for two scores of the same cases (binary ``y``)."""
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return {"auroc_a": math.nan, "auroc_b": math.nan, "z": math.nan, "p": math.nan}
    a, b = np.asarray(score_a, float), np.asarray(score_b, float)
    auc_a, v10a, v01a = _components(a[y], a[~y])
    auc_b, v10b, v01b = _components(b[y], b[~y])
    s10 = np.cov(np.stack([v10a, v10b]))
    s01 = np.cov(np.stack([v01a, v01b]))
    cov = s10 / y.sum() + s01 / (~y).sum()
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    if var <= 0:
        return {"auroc_a": auc_a, "auroc_b": auc_b, "z": 0.0, "p": 1.0}
    z = (auc_a - auc_b) / math.sqrt(var)
    return {"auroc_a": auc_a, "auroc_b": auc_b, "z": float(z), "p": float(2 * norm.sf(abs(z)))}
