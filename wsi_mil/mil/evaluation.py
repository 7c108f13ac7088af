"""What ``wsi-mil evaluate`` reports of a trained run on another cohort: every metric with its 95%
bootstrap interval over patients (:func:`wsi_mil.mil.intervals.bootstrap_ci`), and the plots a paper
shows: ROC and precision-recall curves with bootstrap bands, a calibration curve with its expected
calibration error, a confusion matrix (classification); Kaplan-Meier curves by risk group (survival); a
scatter plot (regression).

The expected calibration error (Guo et al. 2017, "On calibration of modern neural networks"): the cases
binned by predicted probability into ``bins`` equal-width bins B_m, ECE = sum_m |B_m| / n * |acc(B_m) -
conf(B_m)|, with acc the observed positive rate and conf the mean predicted probability of the bin.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .intervals import bootstrap_ci

GRID = np.linspace(0, 1, 101)


def intervals(metrics: dict, groups: np.ndarray, n_boot: int, seed: int) -> dict:
    """``{name: metric(indices)}`` -> ``{name: {value, low, high, n_boot, n_undefined}}``."""
    return {name: bootstrap_ci(fn, groups, n_boot, seed) for name, fn in metrics.items()}


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    y, p = np.asarray(y, float), np.asarray(p, float)
    which = np.minimum((p * bins).astype(int), bins - 1)
    ece = 0.0
    for m in range(bins):
        inside = which == m
        if inside.any():
            ece += inside.mean() * abs(y[inside].mean() - p[inside].mean())
    return float(ece)


def _curves(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TPR on the FPR grid (ROC) and precision on the recall grid (PR), interpolated."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    fpr, tpr, _ = roc_curve(y, p)
    prec, rec, _ = precision_recall_curve(y, p)
    return np.interp(GRID, fpr, tpr), np.interp(GRID, rec[::-1], prec[::-1])


def _bands(y: np.ndarray, p: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> tuple[list, list]:
    """The ROC and PR curves of ``n_boot`` resamples of the patients (those with both classes)."""
    uniq, inv = np.unique(groups, return_inverse=True)
    rng = np.random.default_rng(seed)
    rocs, prs = [], []
    for _ in range(n_boot):
        idx = np.concatenate([np.flatnonzero(inv == g) for g in rng.integers(0, len(uniq), len(uniq))])
        if len(np.unique(y[idx])) == 2:
            a, b = _curves(y[idx], p[idx])
            rocs.append(a)
            prs.append(b)
    return rocs, prs


def _plot_curve(plt, path: Path, curve: np.ndarray, band: list, name: str, labels: tuple[str, str]) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if band:
        lo, hi = np.quantile(np.array(band), [0.025, 0.975], axis=0)
        ax.fill_between(GRID, lo, hi, alpha=0.25, label="95% bootstrap band")
    ax.plot(GRID, curve, label=name.upper())
    if name == "roc":
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(xlabel=labels[0], ylabel=labels[1], xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right" if name == "roc" else "lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_calibration(plt, path: Path, y: np.ndarray, p: np.ndarray, positive: str) -> float:
    ece = expected_calibration_error(y, p)
    which = np.minimum((p * 10).astype(int), 9)
    bins = [m for m in range(10) if (which == m).any()]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.plot([p[which == m].mean() for m in bins], [y[which == m].mean() for m in bins], marker="o")
    ax.set(xlabel=f"predicted P({positive})", ylabel="observed rate", xlim=(0, 1), ylim=(0, 1),
           title=f"calibration, ECE {ece:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return ece


def plot_classification(out: Path, y: np.ndarray, p: np.ndarray, pred: np.ndarray, classes: list[str],
                        groups: np.ndarray, n_boot: int, seed: int) -> dict:
    """roc.png and pr.png (binary: the curve with its 95% bootstrap band over patients), calibration.png
    (binary), confusion.png (every task with classes). Returns the ECE for binary runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    extra = {}
    if len(classes) == 2 and len(np.unique(y)) == 2:
        (roc, pr), (rocs, prs) = _curves(y, p), _bands(y, p, groups, n_boot, seed)
        _plot_curve(plt, out / "roc.png", roc, rocs, "roc", ("false positive rate", "true positive rate"))
        _plot_curve(plt, out / "pr.png", pr, prs, "pr", ("recall", "precision"))
        extra["ece"] = _plot_calibration(plt, out / "calibration.png", y.astype(float), p, classes[1])
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ConfusionMatrixDisplay.from_predictions(y, pred, labels=list(range(len(classes))), display_labels=classes,
                                            ax=ax, colorbar=False)
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=100)
    plt.close(fig)
    return extra


def guarded(fn, y: np.ndarray, need: int = 2):
    """``fn(indices)``, NaN on resamples with fewer than ``need`` distinct values of ``y`` (undefined)."""
    return lambda i: fn(i) if len(np.unique(y[i])) >= need else math.nan


def given(fn, y: np.ndarray, label):
    """``fn(indices)``, NaN on resamples without a bag of ``label``: a recall (sensitivity, specificity)
    needs only its own class, so an all-tumour cohort still has a sensitivity."""
    return lambda i: fn(i) if (y[i] == label).any() else math.nan
