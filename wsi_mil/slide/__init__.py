"""Slide reading: one interface over openslide and tiffslide, mpp resolution, slide discovery."""

from .discover import SlideRef, discover_slides
from .mpp import resolve_mpp
from .reader import SlideReader, open_slide

__all__ = ["SlideRef", "SlideReader", "discover_slides", "open_slide", "resolve_mpp"]
