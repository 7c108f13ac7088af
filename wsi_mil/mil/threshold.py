"""The operating threshold of a binary classifier, picked on out-of-fold predictions (``train.threshold``).

- ``youden``: the threshold maximising Youden's J = sensitivity + specificity - 1 (Youden 1950, "Index for
  rating diagnostic tests"), over the ROC curve's thresholds (sklearn's ``roc_curve``);
- ``sensitivity@0.95``: the highest threshold whose sensitivity is at least 0.95 (a screening operating
  point: as specific as possible at that sensitivity);
- a number in (0, 1), e.g. ``0.5``: that threshold (0.5 is the argmax of two probabilities).
A bag is called positive when its probability of the positive class (the second) is >= the threshold.
"""

from __future__ import annotations

import math
import re

import numpy as np

from ..config import THRESHOLD_RULE

RULE = re.compile(THRESHOLD_RULE)


def pick_threshold(y: np.ndarray, p_positive: np.ndarray, rule: str) -> float:
    """The threshold ``rule`` gives on these labels (0/1) and positive-class probabilities."""
    from sklearn.metrics import roc_curve

    if not RULE.match(rule):
        raise ValueError(f"train.threshold: '{rule}' is not youden, sensitivity@<0-1> or a number in (0, 1)")
    if rule[0].isdigit() or rule.startswith("."):
        return float(rule)
    y = np.asarray(y).astype(int)
    if len(np.unique(y)) < 2:
        return 0.5  # no ROC curve on one class: the argmax
    fpr, tpr, thr = roc_curve(y, p_positive, drop_intermediate=False)  # every cut: the dropped ones can be the answer
    thr = np.minimum(thr, 1.0)  # sklearn's first threshold is inf ("call nothing positive")
    if rule == "youden":
        return float(thr[int(np.argmax(tpr - fpr))])
    target = float(rule.split("@")[1])
    ok = np.flatnonzero(tpr >= target - 1e-12)
    return float(thr[ok[0]]) if len(ok) else float(thr[-1])


def operating_point(y: np.ndarray, p_positive: np.ndarray, threshold: float) -> dict:
    """Sensitivity and specificity of calling ``p >= threshold`` positive."""
    y = np.asarray(y).astype(bool)
    call = np.asarray(p_positive) >= threshold
    sens = float((call & y).sum() / y.sum()) if y.any() else math.nan
    spec = float((~call & ~y).sum() / (~y).sum()) if (~y).any() else math.nan
    return {"sensitivity": sens, "specificity": spec}
