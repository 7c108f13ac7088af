"""Flat images: PNG, JPEG, BMP (TMA cores, crops, exported regions), one level decoded once with OpenCV.

Flat TIFFs are not read here: tiffslide reads them strip by strip (tifffile's chunked store), never whole,
with their resolution tags. These formats carry no reliable µm/px: give it in ``slides.mpp_csv`` or
``slides.default_mpp``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .backends import NotThisFormat, RGBAView, register_backend

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


@register_backend("image", priority=40)
class ImageBackend:
    def __init__(self, path: Path):
        path = Path(path)
        if path.suffix.lower() not in SUFFIXES or path.is_dir():
            raise NotThisFormat(f"not a flat image ({', '.join(sorted(SUFFIXES))})")
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError("cannot decode the image")
        self._rgb = np.ascontiguousarray(bgr[..., ::-1])
        h, w = self._rgb.shape[:2]
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)
        self.properties = {"image.format": path.suffix.lower().lstrip(".")}

    def read(self, location, level, size) -> np.ndarray:
        x, y = int(location[0]), int(location[1])
        return self._rgb[y:y + int(size[1]), x:x + int(size[0])].copy()

    def deepzoom_source(self):
        return RGBAView(self)

    def close(self) -> None:
        self._rgb = np.zeros((0, 0, 3), np.uint8)
