"""A patch grid at an exact physical resolution, filtered by a tissue mask (vectorised).

The level-0 footprint of a patch is ``patch_size * target_mpp / slide_mpp``; patches are read from the
pyramid level with the largest mpp that is still <= target_mpp and resized to ``patch_size``.

What the field's readers take from a patch file (:func:`reader_attrs`):

- CLAM reads ``patch_size`` px at ``patch_level`` (``read_region(coord, patch_level, (patch_size,)*2)``)
  and stitches with ``patch_size * level_downsample[patch_level]``.
- TRIDENT reads a level-0 footprint of ``round(patch_size * level0_magnification / target_magnification)``
  px (magnification = 10 / mpp), takes ``overlap`` in pixels of that same frame, and falls back to its
  CLAM path when either magnification is missing.

One file satisfies both: ``patch_size`` is the edge *at the read level* and ``target_magnification`` is
that level's magnification. Both tools then read exactly our footprint (``patch_size_level0``) from
exactly the pixels we read. Our own target description stays in ``target_mpp`` / ``patch_size_target``
(the edge at ``target_mpp``, i.e. ``tiling.patch_size``) and ``overlap_fraction``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .config import TilingConfig


@dataclass
class Grid:
    coords: np.ndarray  # (N, 2) int64 level-0 top-left (x, y), row-major
    cells: np.ndarray  # (N, 2) int64 grid (col, row) of each kept patch
    shape: tuple[int, int]  # (cols, rows) of the full grid
    patch_size_level0: float
    step_level0: float
    tissue_fraction: np.ndarray  # (N,) float32


def grid_axes(width0: int, height0: int, size0: float, step0: float) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 x and y positions of every full patch that fits inside the slide."""
    nx = int(np.floor((width0 - size0) / step0)) + 1 if width0 >= size0 else 0
    ny = int(np.floor((height0 - size0) / step0)) + 1 if height0 >= size0 else 0
    xs = np.round(np.arange(nx) * step0).astype(np.int64)
    ys = np.round(np.arange(ny) * step0).astype(np.int64)
    return xs, ys


def box_fractions(mask: np.ndarray, scale: float, x0: np.ndarray, y0: np.ndarray, size0: float) -> np.ndarray:
    """Mean of ``mask`` over level-0 boxes, via one summed-area table (no per-patch loop)."""
    integral = cv2.integral(mask.astype(np.uint8, copy=False), sdepth=cv2.CV_32S)  # int32 holds any mask's count
    mh, mw = mask.shape

    def to_mask(v, limit):
        return np.clip(np.round(v / scale).astype(np.int64), 0, limit)

    mx0, my0 = to_mask(x0, mw), to_mask(y0, mh)
    mx1 = np.maximum(to_mask(x0 + size0, mw), np.minimum(mx0 + 1, mw))
    my1 = np.maximum(to_mask(y0 + size0, mh), np.minimum(my0 + 1, mh))
    total = (integral[my1, mx1].astype(np.int64) - integral[my0, mx1] - integral[my1, mx0] + integral[my0, mx0])
    area = np.maximum((mx1 - mx0) * (my1 - my0), 1)
    return (total / area).astype(np.float32)


def make_grid(
    width0: int, height0: int, slide_mpp: float, mask: np.ndarray, mask_scale: float, cfg: TilingConfig
) -> Grid:
    """Keep grid patches whose tissue fraction is >= ``cfg.min_tissue_fraction``."""
    size0 = cfg.patch_size * cfg.target_mpp / slide_mpp
    step0 = size0 * (1.0 - cfg.overlap)
    xs, ys = grid_axes(width0, height0, size0, step0)
    gx, gy = np.meshgrid(np.arange(len(xs)), np.arange(len(ys)))  # row-major: y outer, x inner
    gx, gy = gx.ravel(), gy.ravel()
    frac = box_fractions(mask, mask_scale, xs[gx], ys[gy], size0) if gx.size else np.zeros(0, np.float32)
    keep = frac >= max(cfg.min_tissue_fraction, 1e-9)
    coords = np.stack([xs[gx[keep]], ys[gy[keep]]], axis=1).astype(np.int64).reshape(-1, 2)
    cells = np.stack([gx[keep], gy[keep]], axis=1).astype(np.int64).reshape(-1, 2)
    return Grid(coords, cells, (len(xs), len(ys)), size0, step0, frac[keep])


def patch_read_geometry(reader, target_mpp: float, size0: float) -> tuple[int, int]:
    """(level, size at that level) to read a patch whose level-0 footprint is ``size0``."""
    level = reader.best_level_for_mpp(target_mpp)
    return level, max(1, int(round(size0 / reader.level_downsamples[level])))


def reader_attrs(reader, level: int, size_at_level: int, grid: Grid, cfg: TilingConfig, name: str) -> dict:
    """The :class:`~wsi_mil.formats.PatchSpec` fields CLAM and TRIDENT read unchanged (module docstring)."""
    ds = float(reader.level_downsamples[level])
    level0_mag = 10.0 / reader.mpp
    return {
        "patch_size": int(size_at_level),  # edge at patch_level: CLAM's meaning, and TRIDENT's with the mags below
        "patch_level": int(level),
        "downsample": ds,
        "level_dim": tuple(int(v) for v in reader.level_dimensions[level]),
        "name": name,
        "level0_magnification": float(level0_mag),
        "target_magnification": float(level0_mag / ds),  # the magnification patch_size is measured at
        "overlap": int(round(size_at_level * cfg.overlap)),  # px at patch_level (TRIDENT)
        "patch_size_level0": int(round(grid.patch_size_level0)),
        "level0_width": int(reader.dimensions[0]),
        "level0_height": int(reader.dimensions[1]),
    }
