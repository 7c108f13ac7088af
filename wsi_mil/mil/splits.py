"""Splits: k-fold stratified by label and grouped by patient (no patient on both sides), a validation
share carved out of each training fold the same way, or a fixed split from a CSV column."""

from __future__ import annotations

import logging
import warnings

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from ..errors import WsiMilError

log = logging.getLogger(__name__)


def max_splits(idx: np.ndarray, y: np.ndarray, groups: np.ndarray) -> int:
    """The most stratified, patient-grouped splits ``idx`` allows: no more than its patients, nor than the
    slides of its rarest class (sklearn's StratifiedGroupKFold refuses more)."""
    _, counts = np.unique(y[idx], return_counts=True)
    return int(min(len(np.unique(groups[idx])), counts.min() if len(counts) else 0))


def _group_split(idx: np.ndarray, y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int):
    """Yield (rest, held) index pairs over ``idx`` with StratifiedGroupKFold (``n_splits`` already possible)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" on small cohorts
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        for rest, held in cv.split(idx, y[idx], groups[idx]):
            yield idx[rest], idx[held]


def _carve_val(train: np.ndarray, y, groups, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if val_fraction <= 0:
        return train, np.zeros(0, np.int64)
    k = min(max(2, int(round(1 / val_fraction))), max_splits(train, y, groups))
    if k < 2 or 1 / k > 2 * val_fraction or len(np.unique(y[train])) < 2:
        # fewer splits hold out a larger share; past twice val_fraction, train without early stopping
        log.warning("a training fold of %d slides is too small to hold out an early-stopping share of about "
                    "train.val_fraction=%g per class: it trains for train.epochs without one", len(train), val_fraction)
        return train, np.zeros(0, np.int64)
    rest, held = next(_group_split(train, y, groups, k, seed + 7919))
    return rest, held


def kfold_splits(y: np.ndarray, groups: np.ndarray, folds: int, val_fraction: float, seed: int):
    """List of (train, val, test) index arrays. Asking for more folds than the cohort allows uses as many
    as it allows (with a warning); a cohort whose rarest class has one slide cannot be cross-validated."""
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise WsiMilError("cross-validation needs at least two patients")
    all_idx = np.arange(len(y))
    if folds == 1:
        train, val = _carve_val(all_idx, y, groups, val_fraction, seed)
        return [(train, val, np.zeros(0, np.int64))]
    possible = max_splits(all_idx, y, groups)
    if possible < 2:
        raise WsiMilError(f"train.folds={folds}: the rarest class has a single slide (or patient), so no "
                          f"stratified split can test it; add slides, or use train.folds=1 (one split, no test)")
    if folds > possible:
        log.warning("train.folds=%d but the cohort allows at most %d stratified, patient-grouped folds "
                    "(%d patients; rarest class %d): using %d folds", folds, possible, n_groups,
                    np.unique(y, return_counts=True)[1].min(), possible)
        folds = possible
    out = []
    for f, (train, test) in enumerate(_group_split(all_idx, y, groups, folds, seed)):
        train, val = _carve_val(train, y, groups, val_fraction, seed + f)
        out.append((train, val, test))
    return out


def fixed_split(splits: list[str | None]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One (train, val, test) from a column holding train / val / test."""
    s = np.array([str(v).strip().lower() for v in splits])
    bad = sorted(set(s) - {"train", "val", "test"})
    if bad:
        raise WsiMilError(f"split column values must be train, val or test; found {bad}")
    return [tuple(np.flatnonzero(s == name) for name in ("train", "val", "test"))]
