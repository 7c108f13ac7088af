"""Low-resolution images of JPEG-tiled TIFF levels without decoding them at full size.

A tissue mask at 8 µm/px on a 0.25 µm/px Aperio file (levels 1/4/16/64) comes from the 4 µm/px level:
decoding all of it and then halving costs several times the work needed. libjpeg can scale while it
decodes (the IDCT yields 1/2, 1/4 or 1/8 of each 8x8 block directly); OpenCV exposes that as
``IMREAD_REDUCED_COLOR_{2,4,8}`` (Pillow as draft mode, the fall-back). Tiles are decoded on a thread
pool and pasted into the scaled level; ``cv2.imdecode`` runs wholly outside the GIL, which measured 1.6x
faster than Pillow's draft path on 500 tiles (identical pixels).

Works for tiled, JPEG-compressed pages (SVS and generic tiled TIFF; abbreviated streams get the page's
JPEGTables; Aperio's RGB-coded JPEG gets an Adobe marker so it is not taken for YCbCr). Anything else
returns None and the caller reads regions as before.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
           8: cv2.IMREAD_REDUCED_COLOR_8}
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"  # APP14, transform 0: the components are RGB
JPEG = 7


def _page_for(tif, width: int, height: int):
    for page in tif.pages:
        if (page.is_tiled and page.compression == JPEG and page.imagewidth == width and page.imagelength == height
                and page.samplesperpixel == 3):
            return page
    return None


def decode_level_scaled(path: str | Path, width: int, height: int, factor: int, workers: int | None = None):
    """The level of size (width, height) decoded at 1/``factor`` (2, 4 or 8), as RGB uint8 of shape
    (ceil(height / factor), ceil(width / factor), 3); None when the level is not a JPEG-tiled TIFF page."""
    import tifffile
    from PIL import Image

    if factor not in (1, 2, 4, 8):
        raise ValueError("factor must be 1, 2, 4 or 8")
    try:
        tif = tifffile.TiffFile(str(path))
    except Exception:
        return None
    with tif:
        page = _page_for(tif, width, height)
        if page is None:
            return None
        tw, th = page.tilewidth, page.tilelength
        across, down = -(-width // tw), -(-height // th)
        tables = page.jpegtables or b""
        rgb = page.photometric == 2
        fh = tif.filehandle
        raw = []
        for i, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
            if i >= across * down:
                break
            fh.seek(offset)
            raw.append(fh.read(count))
    out = np.full((-(-height // factor), -(-width // factor), 3), 255, np.uint8)
    stw, sth = tw // factor, th // factor

    def decode(i: int) -> None:
        data = raw[i]
        if not data:
            return  # a sparse tile: background
        if tables:
            data = tables[:-2] + data[2:]
        if rgb:
            data = data[:2] + ADOBE_RGB + data[2:]
        tile = cv2.imdecode(np.frombuffer(data, np.uint8), REDUCED[factor] | cv2.IMREAD_IGNORE_ORIENTATION)
        if tile is not None:
            tile = tile[..., ::-1]  # BGR -> RGB (a view; the paste below copies)
        else:  # a stream OpenCV refuses: Pillow's draft mode does the same scaled decode
            im = Image.open(io.BytesIO(data))
            im.draft("RGB", (tw // factor, th // factor))
            tile = np.asarray(im.convert("RGB"))
        y, x = (i // across) * sth, (i % across) * stw
        h, w = min(tile.shape[0], out.shape[0] - y), min(tile.shape[1], out.shape[1] - x)
        out[y:y + h, x:x + w] = tile[:h, :w]

    n = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(decode, range(len(raw))))
    return out
