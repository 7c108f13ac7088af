"""Pyramidal tiled JPEG TIFFs that openslide and tiffslide both open, with their mpp.

Aperio-style layout: IFD 0 is level 0 (description carries ``MPP``), IFD 1 a small stripped thumbnail,
then the reduced levels as tiled IFDs. Resolution tags (centimetres) give the mpp of every level.
BigTIFF is used when the file could pass 4 GB.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import numpy as np
import tifffile

from .atomic import atomic_path

TileSource = Callable[[int, int, int, int], Iterator[np.ndarray]]  # (ds, width, height, tile) -> tiles


def iter_tiles(image: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """Row-major tiles of an in-memory RGB image, padded white to full tiles."""
    h, w = image.shape[:2]
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            t = image[y:y + tile, x:x + tile]
            if t.shape[:2] != (tile, tile):
                pad = np.full((tile, tile, 3), 255, np.uint8)
                pad[:t.shape[0], :t.shape[1]] = t
                t = pad
            yield t


def description_text(text: str) -> str:
    """Free text made safe inside an Aperio description: readers split it on ``|`` into ``key = value``
    fields, so a slide named ``x|MPP = 100|y`` must not become a field. Separators, ``=`` and control
    characters are replaced. TIFF ASCII tags hold 7-bit text only, so other characters are written as
    their percent-encoded UTF-8 (``é`` -> ``%C3%A9``; ``urllib.parse.unquote`` gives the name back)."""
    safe = "".join("_" if c in "|=" or ord(c) < 32 or ord(c) == 127 else c for c in str(text))
    return "".join(c if ord(c) < 128 else quote(c, safe="") for c in safe)


def write_pyramid(path: str | Path, width: int, height: int, downsamples: list[int], tiles: TileSource,
                  thumbnail: np.ndarray, mpp: float | None, description: str, tile: int = 256,
                  quality: int = 85, resolution_tags: bool = True) -> None:
    """Write levels ``downsamples`` (the first must be 1), each from ``tiles(ds, w, h, tile)``, atomically."""
    big = width * height * 3 * 1.4 > 2**31
    jpeg = {"compression": "jpeg", "compressionargs": {"level": quality}, "photometric": "rgb",
            "subfiletype": 0, "metadata": None}

    def res(ds: float) -> dict:
        if not resolution_tags or mpp is None:
            return {}
        per_cm = 1e4 / (mpp * ds)
        return {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}

    head = f"Aperio Image Library v12.0.0 \r\n{width}x{height}"
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=big) as tif:
        tif.write(tiles(1, width, height, tile), shape=(height, width, 3), dtype=np.uint8, tile=(tile, tile),
                  description=f"{head} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q={quality}|{description}",
                  maxworkers=2, **jpeg, **res(1))
        th, tw = thumbnail.shape[:2]
        tif.write(thumbnail, rowsperstrip=16, description=f"{head} -> {tw}x{th} - thumbnail", **jpeg)
        for ds in downsamples[1:]:
            lw, lh = width // ds, height // ds
            tif.write(tiles(ds, lw, lh, tile), shape=(lh, lw, 3), dtype=np.uint8, tile=(tile, tile),
                      description=f"{head} -> {lw}x{lh} - ", maxworkers=2, **jpeg, **res(ds))
