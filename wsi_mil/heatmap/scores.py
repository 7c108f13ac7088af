"""Per-patch scores: raw attention logits, softmax attention, and per-slide percentile ranks."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    if len(logits) == 0:
        return logits.astype(np.float64)
    z = np.exp(logits - logits.max())
    return z / z.sum()


def percentile_rank(values: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Mid-rank percentile (0-100) of each value within ``reference`` (default: the values themselves).

    Computed for all values at once with ``searchsorted`` on the sorted reference; tied values get the
    same percentile: 100 * (#below + 0.5 * #equal) / n (``scipy.stats.percentileofscore(kind='mean')``).
    """
    values = np.asarray(values, np.float64)
    ref = np.sort(np.asarray(values if reference is None else reference, np.float64))
    if len(ref) == 0:
        return np.full(values.shape, np.nan)
    below = np.searchsorted(ref, values, side="left")
    upto = np.searchsorted(ref, values, side="right")
    return 100.0 * (below + 0.5 * (upto - below)) / len(ref)


def tumour_fraction(coords: np.ndarray, size0: float, truth: np.ndarray, truth_scale: float) -> np.ndarray:
    """Fraction of each patch covered by a ground-truth mask (level-0 px per mask px = truth_scale)."""
    from ..tiling import box_fractions

    return box_fractions(truth, truth_scale, coords[:, 0], coords[:, 1], size0)
