"""Deep Zoom tiles of a slide, for the viewer: openslide's own ``DeepZoomGenerator`` over whatever the
slide's backend offers as its source (``Backend.deepzoom_source``). The Deep Zoom image has the level-0
size (``limit_bounds=False``), so Deep Zoom coordinates are level-0 pixel coordinates scaled by a power of
two, the same frame as the patch coordinates.
"""

from __future__ import annotations

from .reader import SlideReader


def deepzoom(reader: SlideReader, tile_size: int = 256, overlap: int = 0):
    """An ``openslide.deepzoom.DeepZoomGenerator`` over ``reader``'s slide (full level-0 extent)."""
    from openslide.deepzoom import DeepZoomGenerator

    return DeepZoomGenerator(reader.deepzoom_source(), tile_size=tile_size, overlap=overlap, limit_bounds=False)
