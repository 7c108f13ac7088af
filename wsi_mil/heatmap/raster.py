"""Slide-aligned score rasters: raster pixel (i, j) covers level-0 [j*ds, (j+1)*ds) x [i*ds, (i+1)*ds).

Patch contributions are accumulated with 2-D difference arrays (no per-patch drawing); overlapping
patches average. Pixels no patch covers are NaN, and everything outside the tissue mask is NaN.
"""

from __future__ import annotations

import math

import cv2
import numpy as np


def raster_downsample(slide_mpp: float, mpp: float | None, downsample: float | None) -> float:
    """Level-0 px per raster px, from ``heatmap.downsample`` or ``heatmap.mpp``."""
    if downsample:
        return float(downsample)
    return float(mpp) / slide_mpp


def patch_boxes(coords: np.ndarray, size0: float, ds: float, shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Raster boxes [x0, x1) x [y0, y1) of patches; every patch covers at least one raster pixel."""
    h, w = shape
    x0 = np.clip(np.round(coords[:, 0] / ds).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.round(coords[:, 1] / ds).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.maximum(np.round((coords[:, 0] + size0) / ds).astype(np.int64), x0 + 1), 1, w)
    y1 = np.clip(np.maximum(np.round((coords[:, 1] + size0) / ds).astype(np.int64), y0 + 1), 1, h)
    return x0, x1, y0, y1


def _box_sums(values: np.ndarray, boxes, shape) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel sum of ``values`` and count of patches: the signed corners of every box go into one
    2-channel difference array (one bincount; corners past the edge are dropped), then one summed-area pass."""
    h, w = shape
    x0, x1, y0, y1 = boxes
    ys = np.concatenate([y0, y0, y1, y1])
    xs = np.concatenate([x0, x1, x0, x1])
    sign = np.repeat([1.0, -1.0, -1.0, 1.0], len(x0))
    val = np.tile(values, 4) * sign
    inside = (ys < h) & (xs < w)
    flat = (ys * w + xs)[inside] * 2
    diff = np.bincount(np.concatenate([flat, flat + 1]), np.concatenate([val[inside], sign[inside]]),
                       minlength=h * w * 2).reshape(h, w, 2)
    acc = cv2.integral(diff, sdepth=cv2.CV_64F)[1:, 1:]
    return acc[..., 0], acc[..., 1]


def score_raster(coords: np.ndarray, values: np.ndarray, size0: float, width0: int, height0: int,
                 ds: float) -> np.ndarray:
    """float32 raster of mean patch value per pixel; NaN where no patch lies."""
    shape = (max(1, math.ceil(height0 / ds)), max(1, math.ceil(width0 / ds)))
    if len(coords) == 0:
        return np.full(shape, np.nan, np.float32)
    boxes = patch_boxes(np.asarray(coords), size0, ds, shape)
    total, count = _box_sums(np.asarray(values, np.float64), boxes, shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(count > 0.5, total / np.maximum(count, 1), np.nan)
    return out.astype(np.float32)


def clip_to_tissue(raster: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is None:
        return raster
    m = cv2.resize(mask.astype(np.uint8), raster.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    return np.where(m, raster, np.nan).astype(np.float32)


def smooth(raster: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian smoothing over valid pixels only (normalised convolution); NaN stays NaN."""
    if sigma_px <= 0:
        return raster
    valid = np.isfinite(raster)
    num = cv2.GaussianBlur(np.where(valid, raster, 0).astype(np.float32), (0, 0), sigma_px)
    den = cv2.GaussianBlur(valid.astype(np.float32), (0, 0), sigma_px)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid, num / np.maximum(den, 1e-6), np.nan).astype(np.float32)


def colorize(raster: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """RGB uint8 of a [0, 1] raster through a matplotlib colormap (one cv2.LUT pass); NaN becomes white."""
    from matplotlib import colormaps

    lut = (colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    idx = np.clip(np.nan_to_num(raster, nan=0.0) * 255, 0, 255).astype(np.uint8)
    rgb = cv2.LUT(cv2.merge([idx, idx, idx]), lut.reshape(256, 1, 3))
    rgb[~np.isfinite(raster)] = 255
    return rgb
