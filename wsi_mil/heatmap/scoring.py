"""One slide's map: a model's bag outputs in, the typed :class:`~wsi_mil.formats.Scores`, the score raster
and the per-patch measurements out. The heatmap stage only loads, calls this and writes; it knows no
percentile or raster arithmetic, and this module knows no model or encoder (they come in as arrays and a
callable).

The map is the predicted class's, or the most probable target's (per-class heads score every class or
target; the others are kept and exported); one map for single-output tasks (survival risk, regression).
Values are per-slide percentile ranks of the attention logits, so maps compare across slides; for a
patient-level bag, ranks over the patient's whole bag, so its slides compare with each other. With
``heatmap.refine`` the patches of a denser grid (``refine_overlap``) that lie on tissue are scored by the
same model and ranked against the base grid's logits; they join the raster but not the bag prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..config import HeatmapConfig
from ..formats import PatchSpec, Scores, TissueMask
from ..tiling import box_fractions, grid_axes
from .raster import clip_to_tissue, raster_downsample, score_raster, smooth
from .scores import percentile_rank, softmax

# new level-0 coords (M, 2) -> their instance scores (M,) for the mapped class
RefineScorer = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SlideMap:
    scores: Scores
    values: dict[str, float]  # the bag's prediction in the task's columns (prob_<class>, risk, pred, ...)
    raster: np.ndarray  # percentile / 100 per raster pixel, NaN off tissue or where no patch lies
    raster_downsample: float
    measurements: dict[str, np.ndarray]  # per base patch, for the GeoJSON export

    @property
    def prediction(self) -> str:
        return self.scores.mapped_class

    @property
    def n_refined(self) -> int:
        return len(self.scores.refined_coords)


def dense_grid(coords: np.ndarray, spec: PatchSpec, mask: TissueMask | None, overlap: float) -> np.ndarray:
    """Top-left corners of a grid ``overlap`` denser than the base one, on tissue, not already in ``coords``."""
    size0 = float(spec.patch_size_level0)
    xs, ys = grid_axes(spec.level0_width, spec.level0_height, size0, size0 * (1 - overlap))
    gx, gy = np.meshgrid(xs, ys)
    dense = np.stack([gx.ravel(), gy.ravel()], 1)
    if mask is not None:
        scale = spec.level0_width / mask.mask.shape[1]
        frac = box_fractions(mask.mask, scale, dense[:, 0], dense[:, 1], size0)
        dense = dense[frac >= max(spec.min_tissue_fraction, 1e-9)]
    known = {tuple(c) for c in coords.tolist()}
    return np.array([c for c in dense.tolist() if tuple(c) not in known], np.int64).reshape(-1, 2)


@dataclass(frozen=True)
class BagScores:
    """One bag's model outputs as the map needs them, whatever the task.

    ``maps``: the names of the per-map rows (classes, targets; one name when there is one map) and
    ``mapped`` the overlay's; ``attention`` (N,) the overlay's instance scores and ``rows`` (M, N) every
    map's, or None; ``values``: the bag's prediction (task columns), copied onto every patch's
    measurements. ``reference`` / ``row_reference``: the scores the percentiles rank against, when the bag
    is larger than this slide (a patient's slides: one scale over all of them); None: this slide's own.
    """

    maps: list[str]
    mapped: str
    attention: np.ndarray
    rows: np.ndarray | None
    values: dict[str, float]
    reference: np.ndarray | None = None
    row_reference: np.ndarray | None = None


def _measurements(bag: BagScores, pct: np.ndarray, row_pct: np.ndarray | None) -> dict[str, np.ndarray]:
    out = {"attention": bag.attention, "attention_percentile": pct}
    if bag.rows is not None:
        for m, s_m, p_m in zip(bag.maps, bag.rows, row_pct):
            out.update({f"attention_{m}": s_m, f"attention_percentile_{m}": p_m})
    out.update({k: np.full(len(bag.attention), v) for k, v in bag.values.items()})
    return out


def map_slide(ident: dict, bag: BagScores, coords: np.ndarray, spec: PatchSpec, mask: TissueMask | None,
              h: HeatmapConfig, refine: RefineScorer | None = None) -> SlideMap:
    """One slide's part of a bag's outputs -> its map. ``ident`` holds ``slide_id``, ``run`` and
    ``model_id`` for the scores file."""
    att, rows = bag.attention, bag.rows
    ref = bag.attention if bag.reference is None else bag.reference
    pct = percentile_rank(att, ref)
    row_pct = None
    if rows is not None:
        row_ref = rows if bag.row_reference is None else bag.row_reference
        row_pct = np.stack([percentile_rank(s, r) for s, r in zip(rows, row_ref)])
    new, new_pct = np.zeros((0, 2), np.int64), np.zeros(0)
    if refine is not None:
        new = dense_grid(coords, spec, mask, h.refine_overlap)
        new_pct = percentile_rank(refine(new), ref) if len(new) else new_pct
    scores = Scores(coords=coords, spec=spec, logits=att.astype(np.float32), attention=softmax(att).astype(np.float32),
                    percentile=pct.astype(np.float32), classes=list(bag.maps), mapped_class=bag.mapped,
                    class_logits=None if rows is None else rows.astype(np.float32),
                    class_percentile=None if rows is None else row_pct.astype(np.float32),
                    refined_coords=new, refined_percentile=new_pct.astype(np.float32), **ident)
    ds = raster_downsample(spec.slide_mpp, h.mpp, h.downsample)
    points, values = scores.points("attention" if rows is None else bag.mapped)
    raster = score_raster(points, values / 100.0, float(spec.patch_size_level0), spec.level0_width,
                          spec.level0_height, ds)
    raster = smooth(clip_to_tissue(raster, None if mask is None else mask.mask),
                    h.smooth_sigma_um / (spec.slide_mpp * ds))
    return SlideMap(scores, dict(bag.values), raster, ds, _measurements(bag, pct, row_pct))
