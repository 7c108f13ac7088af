"""Slide-level metrics from sklearn: AUROC (binary, or macro one-vs-rest), balanced accuracy, accuracy,
macro F1 and per-class precision / recall / F1."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)


def auroc(y: np.ndarray, probs: np.ndarray) -> float:
    n_classes = probs.shape[1]
    if len(np.unique(y)) < 2:
        return math.nan
    if n_classes == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    present = np.unique(y)
    if len(present) < n_classes:  # OvR needs every class; score the ones present
        p = probs[:, present] / probs[:, present].sum(1, keepdims=True)
        return float(roc_auc_score(np.searchsorted(present, y), p, multi_class="ovr", average="macro"))
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def classification_metrics(y: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    y = np.asarray(y)
    pred = probs.argmax(1)
    labels = list(range(len(class_names)))
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    return {
        "auroc": auroc(y, probs),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if len(y) else math.nan,
        "accuracy": float(accuracy_score(y, pred)) if len(y) else math.nan,
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {name: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(class_names)},
        "n": int(len(y)),
    }


def mean_std(per_fold: list[dict], keys=("auroc", "balanced_accuracy", "accuracy", "macro_f1")) -> dict:
    """Mean and std (ddof 1) of each metric over the folds where it is defined (a one-class test fold leaves
    an AUROC undefined: NaN, or null read back from summary.json); NaN where no fold defines it."""
    out = {}
    for k in keys:
        vals = np.array([m.get(k) for m in per_fold], float)  # None (null) and a missing key -> NaN
        vals = vals[np.isfinite(vals)]
        out[k] = {"mean": float(vals.mean()) if len(vals) else math.nan,
                  "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0 if len(vals) else math.nan}
    return out
