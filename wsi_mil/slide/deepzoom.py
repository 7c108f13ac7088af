"""Deep Zoom tiles of a slide, for the viewer: openslide's own ``DeepZoomGenerator`` on either backend.

OpenSlide slides go to the generator as they are. A tiffslide slide is shown to it through a thin view whose
``read_region`` returns the RGBA image the generator composes onto the background (tiffslide gives RGB), and
reads under a lock (tifffile's handles are not meant for concurrent reads). The Deep Zoom image has the
level-0 size (``limit_bounds=False``), so Deep Zoom coordinates are level-0 pixel coordinates scaled by a
power of two, the same frame as the patch coordinates.
"""

from __future__ import annotations

import threading

from PIL import Image

from .reader import SlideReader


class _RGBAView:
    """What ``DeepZoomGenerator`` reads from a tiffslide slide."""

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


def deepzoom(reader: SlideReader, tile_size: int = 256, overlap: int = 0):
    """An ``openslide.deepzoom.DeepZoomGenerator`` over ``reader``'s slide (full level-0 extent)."""
    from openslide.deepzoom import DeepZoomGenerator

    slide = reader._slide if reader.backend == "openslide" else _RGBAView(reader._slide)
    return DeepZoomGenerator(slide, tile_size=tile_size, overlap=overlap, limit_bounds=False)
