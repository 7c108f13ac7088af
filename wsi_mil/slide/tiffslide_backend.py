"""tiffslide (tifffile + imagecodecs, pure Python): SVS and generic pyramidal TIFF, reads that other
processes may share safely. Tried after OpenSlide by ``slides.backend=auto``."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .backends import RGBAView, register_backend


@register_backend("tiffslide", priority=20)
class TiffSlideBackend:
    def __init__(self, path: Path):
        import tiffslide

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._slide = tiffslide.TiffSlide(str(path))
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties = dict(self._slide.properties)

    def read(self, location, level, size) -> np.ndarray:
        arr = self._slide.read_region(location, level, size, as_array=True)
        return np.ascontiguousarray(arr[..., :3])

    def deepzoom_source(self):
        return RGBAView(self)

    def close(self) -> None:
        self._slide.close()
