"""Stage 1: tissue mask -> patch grid -> ``patches/<slide_id>.h5`` (+ masks and QC under ``masks/``).

The ``coords`` attributes are read unchanged by CLAM and TRIDENT (see :mod:`wsi_mil.tiling`).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .. import __version__
from ..atomic import write_text
from ..config import Config, EncoderConfig, TilingConfig, config_to_dict
from ..formats import PatchSpec, TissueMask, read_patch_spec, write_patch_file
from ..h5io import check_patch_file
from ..layout import Layout
from ..qc import contour_qc, fit_qc, grid_qc, write_png
from ..runner.memory import reuse_large_blocks
from ..slide import SlideRef
from ..tiling import Grid, make_grid, patch_read_geometry, reader_attrs
from ..tissue import detect_tissue, load_user_geojson, mask_to_geojson
from .base import SlideStage, current, open_configured


@dataclass
class TileResult:
    slide_id: str
    thumb: np.ndarray  # RGB at the tissue resolution
    mask: np.ndarray  # bool, same grid as thumb
    mask_scale: float  # level-0 px per mask px
    tissue_source: str  # "auto" or the user GeoJSON
    grid: Grid
    spec: PatchSpec


def segment(reader, cfg: Config, slide_id: str) -> tuple[np.ndarray, np.ndarray, float, str]:
    """Thumbnail at ``tissue.mpp``, its tissue mask, level-0 px per mask px, and where the mask came from."""
    thumb, scale = reader.read_at_mpp(cfg.tissue.mpp)
    mask, source = tissue_mask(reader, cfg, slide_id, thumb, scale)
    return thumb, mask, scale, source


def tissue_mask(reader, cfg: Config, slide_id: str, thumb: np.ndarray, scale: float) -> tuple[np.ndarray, str]:
    """The user's GeoJSON mask for this slide when there is one, else the detected one; and which it is."""
    user = load_user_geojson(cfg.tissue.geojson_dir, slide_id, thumb.shape[:2], scale)
    if user is not None:
        return user, "user_geojson"
    return detect_tissue(thumb, scale * reader.mpp, cfg.tissue), "auto"


def compute_tiles(reader, cfg: Config, slide_id: str) -> TileResult:
    """Pure per-slide tiling: an open reader in, mask + grid + attrs out (nothing written)."""
    return grid_tiles(reader, cfg, slide_id, *segment(reader, cfg, slide_id))


def effective_tiling(cfg: Config) -> TilingConfig:
    """``tiling``, with the patch edge and µm/px the user did not set taken from the encoder preset's native
    tile (``encoder.name``; e.g. 224 px at 0.5 µm/px for H-optimus-0, 256 px for Prov-GigaPath). Any other
    encoder keeps the defaults (256 px at 0.5 µm/px)."""
    t = cfg.tiling
    unset = {"patch_size", "target_mpp"} - t.model_fields_set
    if not unset or cfg.encoder.name == EncoderConfig().name:  # the default encoder's tile is the default
        return t
    from ..features.encoders import recipe

    preset = recipe(cfg.encoder.name)
    if preset is None:
        return t
    native = {"patch_size": preset.tile_px, "target_mpp": preset.mpp}
    return t.model_copy(update={k: native[k] for k in unset})


def grid_tiles(reader, cfg: Config, slide_id: str, thumb: np.ndarray, mask: np.ndarray, scale: float,
               source: str) -> TileResult:
    """The patch grid and its attributes for a segmented slide."""
    w0, h0 = reader.dimensions
    tiling = effective_tiling(cfg)
    grid = make_grid(w0, h0, reader.mpp, mask, scale, tiling)
    level, size_at_level = patch_read_geometry(reader, tiling.target_mpp, grid.patch_size_level0)
    spec = PatchSpec(
        **reader_attrs(reader, level, size_at_level, grid, tiling, slide_id),
        # our physical description
        patch_size_target=int(tiling.patch_size),
        patch_size_level=int(size_at_level),
        step_level0=float(grid.step_level0),
        target_mpp=float(tiling.target_mpp),
        slide_mpp=float(reader.mpp),
        mpp_source=str(reader.mpp_source),
        overlap_fraction=float(tiling.overlap),
        min_tissue_fraction=float(tiling.min_tissue_fraction),
        grid_cols=int(grid.shape[0]),
        grid_rows=int(grid.shape[1]),
        backend=str(reader.backend),
        tissue_source=source,
        tissue_mpp=float(scale * reader.mpp),
        tissue_params=config_to_dict(cfg.tissue),
        slide_path=str(reader.path),
        wsi_mil_version=__version__,
    )
    return TileResult(slide_id, thumb, mask, scale, source, grid, spec)


QC_MAX_SIDE = 2048  # mask.png is for a person to look at; the full mask is in the h5


def _capped(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    f = min(1.0, QC_MAX_SIDE / max(h, w))
    img = mask.astype(np.uint8) * 255
    if f < 1:
        img = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    return img


def _mask_outputs(pool, layout: Layout, sid: str, fitted, mask: np.ndarray, scale: float) -> list:
    """mask.png, qc.png and tissue.geojson on ``pool`` (resizing and PNG encoding release the GIL).
    ``fitted`` is the future of the QC-sized thumbnail, submitted before these so that no job waiting on
    it can starve it."""
    return [
        fitted,
        pool.submit(lambda: write_png(layout.mask(sid, "mask.png"), _capped(mask))),
        pool.submit(lambda: write_png(layout.mask(sid, "qc.png"), contour_qc(fitted.result()[0], mask))),
        pool.submit(lambda: write_text(layout.mask(sid, "tissue.geojson"), json.dumps(mask_to_geojson(mask, scale)))),
    ]


def _grid_output(pool, layout: Layout, result: TileResult, fitted):
    g = result.grid

    def draw():
        qc_thumb, f = fitted.result()
        return grid_qc(qc_thumb, result.mask_scale / f, g.cells, g.shape, g.step_level0, g.patch_size_level0)

    return pool.submit(lambda: write_png(layout.mask(result.slide_id, "grid.png"), draw()))


def _patch_file(result: TileResult, layout: Layout) -> None:
    g = result.grid
    write_patch_file(layout.patches(result.slide_id), result.slide_id, g.coords, g.cells, g.tissue_fraction,
                     result.spec, TissueMask(result.mask, result.spec.tissue_mpp, float(result.mask_scale)))


def tile_slide(slide: SlideRef, cfg: Config, layout: Layout) -> str | None:
    """Thumbnail, tissue mask, then the mask's outputs on two threads while the grid is laid; the patch
    file last."""
    sid = slide.slide_id
    reuse_large_blocks()  # each slide's 8-24 MB images reuse the last one's heap (see runner.memory)
    with open_configured(slide, cfg) as reader, ThreadPoolExecutor(2) as pool:
        thumb, scale = reader.read_at_mpp(cfg.tissue.mpp)
        fitted = pool.submit(fit_qc, thumb)  # the QC-sized thumbnail, while the tissue is found
        mask, source = tissue_mask(reader, cfg, sid, thumb, scale)
        jobs = [fitted, *_mask_outputs(pool, layout, sid, fitted, mask, scale)]
        result = grid_tiles(reader, cfg, sid, thumb, mask, scale, source)
        jobs.append(_grid_output(pool, layout, result, fitted))
        for job in jobs:
            job.result()  # re-raises a failed write
    _patch_file(result, layout)
    n = len(result.grid.coords)
    return "no tissue found: 0 patches" if n == 0 else f"{n} patches"


# tiling.<key> -> the PatchSpec field that records it
RECORDED = {"target_mpp": "target_mpp", "patch_size": "patch_size_target", "overlap": "overlap_fraction",
            "min_tissue_fraction": "min_tissue_fraction"}


def stale_reason(spec: PatchSpec, cfg: Config) -> str:
    """Why a patch file is not what this config asks for ('' if it is): a ``tiling`` or ``tissue`` key the
    user set has another value than the file records. Keys left at their defaults are not compared, so
    the tiles another encoder's native size chose are kept rather than redone for each encoder; files
    another tool wrote (no ``wsi_mil_version``) are kept."""
    if not spec.wsi_mil_version:
        return ""
    tiling = effective_tiling(cfg)
    for key in sorted(cfg.tiling.model_fields_set & RECORDED.keys()):
        now, then = float(getattr(tiling, key)), float(getattr(spec, RECORDED[key]))
        if not np.isclose(now, then, rtol=1e-6, atol=0):
            return f"tiled with tiling.{key}={then:g}, now {now:g}"
    tissue = config_to_dict(cfg.tissue)
    for key in sorted(cfg.tissue.model_fields_set):
        if key in spec.tissue_params and spec.tissue_params[key] != tissue[key]:
            return f"tiled with tissue.{key}={spec.tissue_params[key]!r}, now {tissue[key]!r}"
    return ""


def _complete(path: Path, cfg: Config) -> bool:
    """A readable patch file that is also current (:func:`stale_reason`); else redone, the reason in the
    manifest."""
    check_patch_file(path)
    return current(stale_reason(read_patch_spec(path), cfg))


STAGE = SlideStage(
    name="tile",
    process=tile_slide,
    output=lambda layout, sid, cfg: layout.patches(sid),
    folders=lambda layout, cfg: [layout.patches_dir, layout.masks_dir],
    complete=_complete,
)

__all__ = ["STAGE", "TileResult", "compute_tiles", "grid_tiles", "segment", "tile_slide", "tissue_mask"]
