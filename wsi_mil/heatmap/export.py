"""Exports a pathologist can open: overlay PNG, pyramidal TIFF, QuPath GeoJSON, OME-Zarr, top/bottom-k.

Each export is one function taking an :class:`ExportJob` and registered by name (``heatmap.exports``
names them). Adding a format is one function plus ``@register_export("name")``; the heatmap stage loops
over the configured names and a contract test runs every registered export.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..atomic import atomic_path, write_json, write_text
from ..qc import write_png
from ..tiff import description_text, iter_tiles, write_pyramid
from .raster import colorize

OVERLAY_MAX_SIDE = 2048


def overlay_png(path: Path, thumb: np.ndarray, raster: np.ndarray, colour: np.ndarray, cmap: str, alpha: float,
                title: str) -> None:
    """Thumbnail blended with the coloured raster (``colour``) on tissue only, plus a colorbar and a title."""
    h, w = raster.shape
    if thumb.shape[:2] != (h, w):
        thumb = cv2.resize(thumb, (w, h), interpolation=cv2.INTER_AREA)
    # small slides are upscaled so text and bar stay legible; large ones capped (full detail: TIFF / zarr)
    scale = min(max(1.0, 800 / max(h, w)), OVERLAY_MAX_SIDE / max(h, w))
    if scale != 1:
        size = (round(w * scale), round(h * scale))
        thumb = cv2.resize(thumb, size, interpolation=cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA)
        raster = cv2.resize(raster, size, interpolation=cv2.INTER_NEAREST)
        colour = cv2.resize(colour, size, interpolation=cv2.INTER_NEAREST)
        h, w = raster.shape
    img = thumb.copy()
    blend = cv2.addWeighted(thumb, 1 - alpha, colour, alpha, 0)
    cv2.copyTo(blend, np.isfinite(raster).astype(np.uint8), img)
    bar_w, pad, head = max(16, w // 40), max(8, w // 100), max(28, h // 25)
    canvas = np.full((h + head, w + bar_w * 4 + pad, 3), 255, np.uint8)
    canvas[head:, :w] = img
    ramp = colorize(np.linspace(1, 0, h)[:, None].repeat(bar_w, 1).astype(np.float32), cmap)
    canvas[head:, w + pad:w + pad + bar_w] = ramp
    font, fs = cv2.FONT_HERSHEY_SIMPLEX, max(0.4, head / 45)
    for frac, label in ((0.0, "1.0"), (0.5, "0.5"), (1.0, "0.0")):
        y = head + int(frac * (h - 1))
        cv2.putText(canvas, label, (w + pad + bar_w + 4, min(h + head - 4, max(head + 12, y + 5))), font, fs * 0.8,
                    (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(canvas, title, (6, int(head * 0.7)), font, fs, (0, 0, 0), 1, cv2.LINE_AA)
    write_png(path, canvas)


def heatmap_tiff(path: Path, rgb: np.ndarray, mpp: float, slide_id: str) -> None:
    """Coloured heatmap as a pyramidal tiled TIFF; pixel (i, j) is level-0 (j, i) * ds, with its mpp."""
    h, w = rgb.shape[:2]
    levels = [1]
    while max(w, h) // (levels[-1] * 2) >= 256:
        levels.append(levels[-1] * 2)

    def tiles(ds: int, lw: int, lh: int, tile: int):
        level = rgb if ds == 1 else cv2.resize(rgb, (lw, lh), interpolation=cv2.INTER_AREA)
        return iter_tiles(level, tile)

    f = min(1.0, 512 / max(w, h))
    thumb = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    write_pyramid(path, w, h, levels, tiles, thumb, mpp,
                  f"MPP = {mpp:.6f}|Source = wsi_mil heatmap {description_text(slide_id)}", tile=256, quality=90)


def geojson(path: Path, coords: np.ndarray, size0: int, measurements: dict[str, np.ndarray]) -> None:
    """One QuPath detection per patch (closed square in level-0 px) with its measurements."""
    names = list(measurements)
    n = len(coords)
    x, y = coords[:, 0].astype(np.int64), coords[:, 1].astype(np.int64)
    s = int(size0)
    ring = np.stack([x, y, x + s, y, x + s, y + s, x, y + s, x, y], 1)
    vals = [np.nan_to_num(np.asarray(measurements[k], np.float64), nan=0.0, posinf=0.0, neginf=0.0) for k in names]
    table = np.concatenate([ring.astype(object), np.stack(vals, 1).astype(object)], 1) if names else ring
    # names are JSON-escaped, then '%' doubled so a class called "50%d" is text, not a format field
    meas = ",".join(json.dumps(k).replace("%", "%%") + ":%.6g" for k in names)
    fmt = ('{"type":"Feature","geometry":{"type":"Polygon","coordinates":[[[%d,%d],[%d,%d],[%d,%d],[%d,%d],[%d,%d]]]},'
           '"properties":{"objectType":"detection","measurements":{' + meas + "}}}")
    body = ",".join([fmt] * n) % tuple(table.ravel().tolist()) if n else ""  # one C-level format call
    write_text(path, '{"type":"FeatureCollection","features":[' + body + "]}")


def _nanmean_down(a: np.ndarray) -> np.ndarray:
    """Halve a raster, averaging the finite values of each 2x2 block (NaN where none is finite)."""
    h, w = a.shape[0] // 2, a.shape[1] // 2
    valid = np.isfinite(a).astype(np.float32)
    total = cv2.resize(np.where(valid > 0, a, 0).astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    n = cv2.resize(valid, (w, h), interpolation=cv2.INTER_AREA)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1e-6), np.nan).astype(np.float32)


def ome_zarr(path: Path, raster: np.ndarray, mpp: float, name: str, min_size: int = 64) -> None:
    """The score raster as an OME-NGFF 0.4 multiscale image (y, x in micrometres), NaN where no score."""
    import zarr

    levels = [raster.astype(np.float32)]
    while min(levels[-1].shape) // 2 >= min_size:
        levels.append(_nanmean_down(levels[-1]))
    with atomic_path(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        datasets = []
        for i, level in enumerate(levels):
            chunks = (min(512, level.shape[0]), min(512, level.shape[1]))
            arr = root.create_array(str(i), shape=level.shape, chunks=chunks, dtype="float32", fill_value=np.nan,
                                    chunk_key_encoding={"name": "v2", "separator": "/"})  # NGFF 0.4 requires "/"
            arr[:] = level
            # each axis its own ratio, so rows * scale_y is the raster's physical height
            fy, fx = mpp * raster.shape[0] / level.shape[0], mpp * raster.shape[1] / level.shape[1]
            datasets.append({"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [fy, fx]}]})
        root.attrs["multiscales"] = [{
            "version": "0.4", "name": name, "type": "mean",
            "axes": [{"name": "y", "type": "space", "unit": "micrometer"},
                     {"name": "x", "type": "space", "unit": "micrometer"}],
            "datasets": datasets,
        }]
        root.attrs["wsi_mil"] = {"values": "attention percentile / 100", "nan": "no patch or outside tissue"}


def extreme_patches(folder: Path, reader, coords: np.ndarray, scores: np.ndarray, level: int, size: int,
                    k: int) -> list[dict]:
    """Top-k and bottom-k patches (by score) as PNGs named with rank, score and level-0 position."""
    if k <= 0 or len(coords) == 0:
        return []
    order = np.argsort(-scores, kind="stable")
    picks = [("top", i, idx) for i, idx in enumerate(order[:k])]
    picks += [("bottom", i, idx) for i, idx in enumerate(order[::-1][:k])]
    out = []
    for kind, rank, idx in picks:
        x, y = (int(v) for v in coords[idx])
        name = f"{kind}_{rank + 1:02d}_score{scores[idx]:.1f}_x{x}_y{y}.png"
        write_png(folder / name, reader.read_region((x, y), level, (size, size)))
        out.append({"kind": kind, "rank": rank + 1, "index": int(idx), "x": x, "y": y,
                    "score": float(scores[idx]), "file": name})
    return out


def summary_json(path: Path, summary: dict) -> None:
    write_json(path, summary)


# -- the registry --------------------------------------------------------------------------------------

@dataclass
class ExportJob:
    """Everything an export may need for one slide. Exports write under ``folder`` only."""

    folder: Path
    slide_id: str
    reader: object  # an open SlideReader
    raster: np.ndarray  # attention percentile / 100 per raster pixel; NaN off tissue
    colour: np.ndarray  # the raster through the colormap (RGB uint8)
    raster_mpp: float
    coords: np.ndarray  # (N, 2) level-0 top-left of each patch
    size0: int  # patch edge in level-0 px
    patch_level: int
    patch_size_level: int
    measurements: dict[str, np.ndarray]  # per-patch values, name -> (N,)
    percentile: np.ndarray  # (N,) attention percentile
    title: str
    cmap: str
    alpha: float
    top_k: int


Export = Callable[[ExportJob], "dict | None"]
EXPORTS: dict[str, Export] = {}


def register_export(name: str):
    def deco(fn: Export) -> Export:
        EXPORTS[name] = fn
        return fn
    return deco


@register_export("png")
def _png(job: ExportJob) -> None:
    thumb, _ = job.reader.read_at_mpp(job.raster_mpp)
    overlay_png(job.folder / "overlay.png", thumb, job.raster, job.colour, job.cmap, job.alpha, job.title)


@register_export("tiff")
def _tiff(job: ExportJob) -> None:
    heatmap_tiff(job.folder / "heatmap.tiff", job.colour, job.raster_mpp, job.slide_id)


@register_export("geojson")
def _geojson(job: ExportJob) -> None:
    geojson(job.folder / "patches.geojson", job.coords, job.size0, job.measurements)


@register_export("zarr")
def _zarr(job: ExportJob) -> None:
    ome_zarr(job.folder / "scores.zarr", job.raster, job.raster_mpp, job.slide_id)


@register_export("patches")
def _patches(job: ExportJob) -> dict:
    top = extreme_patches(job.folder / "top_k", job.reader, job.coords, job.percentile, job.patch_level,
                          job.patch_size_level, job.top_k)
    return {"top_k": top}
