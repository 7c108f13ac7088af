"""tiffslide (tifffile + imagecodecs, pure Python): SVS and generic pyramidal TIFF, reads that other
processes may share safely. Tried after OpenSlide by ``slides.backend=auto``."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .backends import register_backend


class _RGBAView:
    """What ``DeepZoomGenerator`` reads: RGBA PIL regions (tiffslide gives RGB), under a lock (tifffile's
    handles are not meant for concurrent reads)."""

    def __init__(self, slide):
        self._slide = slide
        self._lock = threading.Lock()
        self.properties = slide.properties
        self.dimensions = slide.dimensions
        self.level_dimensions = slide.level_dimensions
        self.level_downsamples = slide.level_downsamples

    def get_best_level_for_downsample(self, downsample: float) -> int:
        return self._slide.get_best_level_for_downsample(downsample)

    def read_region(self, location, level, size) -> Image.Image:
        with self._lock:
            arr = self._slide.read_region(location, level, size, as_array=True)
        return Image.fromarray(arr[..., :3]).convert("RGBA")


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
        return _RGBAView(self._slide)

    def close(self) -> None:
        self._slide.close()
