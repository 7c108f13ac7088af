"""Splits: k-fold stratified by label and grouped by patient (no patient on both sides), a validation
share carved out of each training fold the same way, or a fixed split from a CSV column."""

from __future__ import annotations

import logging
import warnings

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from ..errors import WsiMilError

log = logging.getLogger(__name__)


def _group_split(idx: np.ndarray, y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int):
    """Yield (rest, held) index pairs over ``idx`` with StratifiedGroupKFold, degrading gracefully."""
    n_groups = len(np.unique(groups[idx]))
    n_splits = max(2, min(n_splits, n_groups))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" on small cohorts
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        for rest, held in cv.split(idx, y[idx], groups[idx]):
            yield idx[rest], idx[held]


def _carve_val(train: np.ndarray, y, groups, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if val_fraction <= 0 or len(np.unique(groups[train])) < 2:
        return train, np.zeros(0, np.int64)
    k = max(2, int(round(1 / val_fraction)))
    rest, held = next(_group_split(train, y, groups, k, seed + 7919))
    return rest, held


def kfold_splits(y: np.ndarray, groups: np.ndarray, folds: int, val_fraction: float, seed: int):
    """List of (train, val, test) index arrays."""
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise WsiMilError("cross-validation needs at least two patients")
    if folds > n_groups:
        log.warning("train.folds=%d but only %d patients: using %d folds", folds, n_groups, n_groups)
    all_idx = np.arange(len(y))
    out = []
    if folds == 1:
        train, val = _carve_val(all_idx, y, groups, val_fraction, seed)
        return [(train, val, np.zeros(0, np.int64))]
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
