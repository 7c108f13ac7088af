"""What the viewer draws for one slide: Deep Zoom slide tiles, heatmap tiles, tissue contours, patch crops.

Heatmap tiles are rendered per request from a score raster built once per map: each patch's percentile
painted over its footprint at a quarter of the patch size (overlaps average; see
:func:`wsi_mil.heatmap.raster.score_raster`) and cleared off tissue. A tile samples that raster at its own
pixel centres, so it lines up with the slide at every zoom level, and is transparent where no patch or no
tissue lies. The colormap is a per-request lookup table.
"""

from __future__ import annotations

import io
import threading
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np

from ..errors import WsiMilError
from ..formats import PatchSpec, Scores, read_patch_spec, read_scores, read_tissue_mask
from ..heatmap.raster import clip_to_tissue, score_raster
from ..slide.deepzoom import deepzoom
from ..slide.mpp import resolve_mpp
from ..slide.reader import SlideReader

TILE = 256
CMAPS = ("jet", "turbo", "viridis", "magma", "inferno", "coolwarm", "RdYlBu_r")
MAX_RASTER_SIDE = 4096
UNREADABLE = (OSError, KeyError, ValueError, TypeError)  # what h5py raises on a truncated or foreign file
CONTOUR_RGBA = (40, 200, 40, 255)


def lut(cmap: str) -> np.ndarray:
    """(256, 4) uint8 RGBA lookup table of a matplotlib colormap (only the names in CMAPS)."""
    return _LUTS[cmap]


def _make_luts() -> dict[str, np.ndarray]:
    from matplotlib import colormaps

    return {name: (colormaps[name](np.linspace(0, 1, 256)) * 255).round().astype(np.uint8) for name in CMAPS}


_LUTS = _make_luts()


def encode_png(rgba: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return buf.tobytes()


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return buf.tobytes()


class SlideView:
    """One slide's pixels and scores. Built lazily; safe to share between request threads."""

    def __init__(self, slide_path: Path, patches: Path | None, scores: Path | None):
        self.slide_path = slide_path
        self._patches, self._scores = patches, scores
        self._lock = threading.Lock()
        self._rasters: dict[str, tuple[np.ndarray, float]] = {}
        self.reader = SlideReader(slide_path)
        self.dz = deepzoom(self.reader, TILE, 0)
        self.width, self.height = self.reader.dimensions
        self.mpp = self._mpp(slide_path)

    def _mpp(self, slide_path: Path) -> float | None:
        """The µm/px the tile stage used (it may have come from an override or a default), else the
        file's own; None hides the scale bar."""
        if self.patch_spec is not None and self.patch_spec.slide_mpp:
            return float(self.patch_spec.slide_mpp)
        try:
            return float(resolve_mpp(self.reader, slide_path.stem, {}, None)[0])
        except WsiMilError:
            return None

    def close(self) -> None:
        self.reader.close()

    # -- slide ------------------------------------------------------------------------------------
    def dzi(self) -> str:
        return self.dz.get_dzi("jpeg")

    def level_scale(self, level: int) -> float:
        """Level-0 px per px of Deep Zoom level ``level``."""
        return float(2 ** (self.dz.level_count - 1 - level))

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int] | None:
        """(x0, y0, w, h) of a tile in level ``level`` px, or None when it lies outside the level."""
        if not 0 <= level < self.dz.level_count:
            return None
        cols, rows = self.dz.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            return None
        lw, lh = self.dz.level_dimensions[level]
        x0, y0 = col * TILE, row * TILE
        return x0, y0, min(TILE, lw - x0), min(TILE, lh - y0)

    def slide_tile(self, level: int, col: int, row: int) -> bytes | None:
        if self.tile_box(level, col, row) is None:
            return None
        tile = self.dz.get_tile(level, (col, row))
        buf = io.BytesIO()
        tile.save(buf, "JPEG", quality=85)
        return buf.getvalue()

    def thumbnail(self, side: int = 256) -> bytes:
        level = max(lv for lv in range(self.dz.level_count) if max(self.dz.level_dimensions[lv]) <= side)
        return self.slide_tile(level, 0, 0)

    def patch_image(self, x: int, y: int, level: int, size: int, side: int = 160) -> bytes:
        rgb = self.reader.read_region((x, y), level, (size, size))
        return encode_jpeg(cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA))

    # -- scores -----------------------------------------------------------------------------------
    @cached_property
    def patch_spec(self) -> PatchSpec | None:
        if self._patches is None:
            return None
        try:
            return read_patch_spec(self._patches)
        except UNREADABLE:
            return None

    @cached_property
    def tissue_mask(self) -> np.ndarray | None:
        if self._patches is None:
            return None
        try:
            found = read_tissue_mask(self._patches)
        except UNREADABLE:
            return None
        return None if found is None else found.mask

    @cached_property
    def scores(self) -> Scores | None:
        """The slide's scores file, or None when there is none or it cannot be read whole (a truncated file
        shows the slide without a heatmap)."""
        if self._scores is None:
            return None
        try:
            return read_scores(self._scores)
        except UNREADABLE:
            return None

    @cached_property
    def maps(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Map name -> (percentile, logits); empty without scores."""
        return {} if self.scores is None else self.scores.maps()

    def raster(self, name: str) -> tuple[np.ndarray, float] | None:
        """(percentile/100 raster, level-0 px per raster px) of map ``name``, built once."""
        with self._lock:
            if name not in self._rasters:
                if name not in self.maps:
                    return None
                size0 = float(self.scores.spec.patch_size_level0)
                ds = max(size0 / 4, max(self.width, self.height) / MAX_RASTER_SIDE, 1.0)
                coords, pct = self.scores.points(name)
                r = score_raster(coords, pct / 100.0, size0, self.width, self.height, ds)
                self._rasters[name] = (clip_to_tissue(r, self.tissue_mask).astype(np.float16), ds)  # 256 levels
            return self._rasters[name]

    def overlay_tile(self, name: str, cmap: str, level: int, col: int, row: int) -> bytes | None:
        box, ras = self.tile_box(level, col, row), self.raster(name)
        if box is None or ras is None:
            return None
        raster, ds = ras
        x0, y0, w, h = box
        f = self.level_scale(level)
        xs = np.minimum(((x0 + np.arange(w) + 0.5) * f / ds).astype(np.int64), raster.shape[1] - 1)
        ys = np.minimum(((y0 + np.arange(h) + 0.5) * f / ds).astype(np.int64), raster.shape[0] - 1)
        vals = raster[np.ix_(ys, xs)].astype(np.float32)
        finite = np.isfinite(vals)
        rgba = lut(cmap)[np.clip(np.nan_to_num(vals) * 255, 0, 255).astype(np.uint8)]
        rgba[..., 3] = np.where(finite, 255, 0)
        return encode_png(rgba)

    # -- tissue contour ---------------------------------------------------------------------------
    @cached_property
    def contours(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Tissue outlines in level-0 px, each with its bounding box (x0, y0, x1, y1)."""
        mask = self.tissue_mask
        if mask is None:
            return []
        found, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        scale = self.width / mask.shape[1]
        out = []
        for c in found:
            pts = (c.reshape(-1, 2).astype(np.float64) + 0.5) * scale
            out.append((pts, np.r_[pts.min(0), pts.max(0)]))
        return out

    def contour_tile(self, level: int, col: int, row: int) -> bytes | None:
        box = self.tile_box(level, col, row)
        if box is None:
            return None
        x0, y0, w, h = box
        f = self.level_scale(level)
        rgba = np.zeros((h, w, 4), np.uint8)
        lo, hi = np.array([x0, y0]) * f, np.array([x0 + w, y0 + h]) * f
        pad = 4 * f
        for pts, bb in self.contours:
            if bb[2] < lo[0] - pad or bb[0] > hi[0] + pad or bb[3] < lo[1] - pad or bb[1] > hi[1] + pad:
                continue
            local = np.round((pts / f - [x0, y0]) * 16).astype(np.int32)  # 4 fractional bits
            cv2.polylines(rgba, [local.reshape(-1, 1, 2)], True, CONTOUR_RGBA, 2, cv2.LINE_AA, 4)
        return encode_png(rgba)
