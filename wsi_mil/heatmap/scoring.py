"""One slide's map: a model's bag outputs in, the typed :class:`~wsi_mil.formats.Scores`, the score raster
and the per-patch measurements out. The heatmap stage only loads, calls this and writes; it knows no
percentile or raster arithmetic, and this module knows no model or encoder (they come in as arrays and a
callable).

The map is the predicted class's (per-class heads score every class; the others are kept and exported).
Values are per-slide percentile ranks of the attention logits, so maps compare across slides. With
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
    probabilities: dict[str, float]
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


def _measurements(classes: list[str], probs: np.ndarray, att: np.ndarray, pct: np.ndarray,
                  class_scores: np.ndarray | None, class_pct: np.ndarray | None) -> dict[str, np.ndarray]:
    out = {"attention": att, "attention_percentile": pct}
    if class_scores is not None:
        for c, s_c, p_c in zip(classes, class_scores, class_pct):
            out.update({f"attention_{c}": s_c, f"attention_percentile_{c}": p_c})
    out.update({f"prob_{c}": np.full(len(att), p) for c, p in zip(classes, probs)})
    return out


def map_slide(ident: dict, classes: list[str], probs: np.ndarray, instance_scores: np.ndarray, coords: np.ndarray,
              spec: PatchSpec, mask: TissueMask | None, h: HeatmapConfig,
              refine: RefineScorer | None = None) -> SlideMap:
    """``probs`` (C,) and ``instance_scores`` ((N,) or (C, N) for per-class heads) of one bag -> its map.
    ``ident`` holds ``slide_id``, ``run`` and ``model_id`` for the scores file."""
    k = int(np.argmax(probs))
    per_class = instance_scores.ndim == 2
    att = instance_scores[k] if per_class else instance_scores
    pct = percentile_rank(att)
    class_pct = np.stack([percentile_rank(s) for s in instance_scores]) if per_class else None
    new, new_pct = np.zeros((0, 2), np.int64), np.zeros(0)
    if refine is not None:
        new = dense_grid(coords, spec, mask, h.refine_overlap)
        new_pct = percentile_rank(refine(new), att) if len(new) else new_pct
    scores = Scores(coords=coords, spec=spec, logits=att.astype(np.float32), attention=softmax(att).astype(np.float32),
                    percentile=pct.astype(np.float32), classes=list(classes), mapped_class=classes[k],
                    class_logits=instance_scores.astype(np.float32) if per_class else None,
                    class_percentile=class_pct.astype(np.float32) if per_class else None,
                    refined_coords=new, refined_percentile=new_pct.astype(np.float32), **ident)
    ds = raster_downsample(spec.slide_mpp, h.mpp, h.downsample)
    points, values = scores.points("attention" if not per_class else classes[k])
    raster = score_raster(points, values / 100.0, float(spec.patch_size_level0), spec.level0_width,
                          spec.level0_height, ds)
    raster = smooth(clip_to_tissue(raster, None if mask is None else mask.mask),
                    h.smooth_sigma_um / (spec.slide_mpp * ds))
    return SlideMap(scores, dict(zip(classes, map(float, probs))), raster, ds,
                    _measurements(classes, probs, att, pct, instance_scores if per_class else None, class_pct))
