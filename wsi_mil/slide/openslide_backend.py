"""OpenSlide (openslide-python with the openslide-bin wheel): Aperio, Hamamatsu, MIRAX, Philips, Leica,
Ventana, generic tiled TIFF, DICOM. Tried first by ``slides.backend=auto``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .backends import register_backend


@register_backend("openslide", priority=10)
class OpenSlideBackend:
    def __init__(self, path: Path):
        import openslide

        self._slide = openslide.OpenSlide(str(path))
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties = dict(self._slide.properties)

    def read(self, location, level, size) -> np.ndarray:
        rgba = np.asarray(self._slide.read_region(location, level, size))
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = 255  # outside the scanned area: white, as tiffslide
        return rgb

    def deepzoom_source(self):
        return self._slide

    def close(self) -> None:
        self._slide.close()
