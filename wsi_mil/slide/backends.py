"""The registry of slide backends. A backend is one class in one file, registered with
``@register_backend("name", priority)``; ``slides.backend=auto`` tries every registered backend by
priority (lowest first) and the one that opened the slide is recorded.

A backend opens a file and answers four things: its levels (dimensions, downsamples), its properties,
``read(location, level, size)`` as RGB uint8 inside the level, and ``deepzoom_source()``, the object
``openslide.deepzoom.DeepZoomGenerator`` reads (``read_region`` returning RGBA PIL images).
:class:`~wsi_mil.slide.reader.SlideReader` does everything else (clipping, mpp, thumbnails) the same
way for all of them. Modules: :mod:`.dicom_backend` (5), :mod:`.ometiff_backend` (8),
:mod:`.openslide_backend` (10), :mod:`.tiffslide_backend` (20), :mod:`.image_backend` (40).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import ConfigError


class Backend(Protocol):
    name: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: dict

    def read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray: ...

    def deepzoom_source(self): ...

    def close(self) -> None: ...


class RGBAView:
    """What ``DeepZoomGenerator`` reads, for a backend that is not OpenSlide itself: its RGB reads as RGBA
    PIL regions, one at a time (tifffile's and wsidicom's handles are not meant for concurrent reads)."""

    def __init__(self, backend: Backend):
        self._backend = backend
        self._lock = threading.Lock()
        self.properties = backend.properties
        self.level_dimensions = backend.level_dimensions
        self.dimensions = backend.level_dimensions[0]
        self.level_downsamples = backend.level_downsamples

    def get_best_level_for_downsample(self, downsample: float) -> int:
        fits = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.01]
        return fits[-1] if fits else 0

    def read_region(self, location, level, size):
        from PIL import Image

        with self._lock:
            return Image.fromarray(self._backend.read(location, level, size)).convert("RGBA")


@dataclass(frozen=True)
class BackendEntry:
    name: str
    priority: int
    open: type  # called with the slide's path; raises when it cannot read it


BACKENDS: dict[str, BackendEntry] = {}


class NotThisFormat(ValueError):
    """Raised by a backend for input that is not its kind at all (a file for the DICOM folder reader, a
    TIFF for the flat-image reader): ``auto`` moves on without listing it among the reasons."""


def register_backend(name: str, priority: int):
    def deco(cls):
        BACKENDS[name] = BackendEntry(name, priority, cls)
        cls.name = name
        return cls
    return deco


def backend_order(choice: str) -> list[BackendEntry]:
    """The backends ``slides.backend`` names: one, or all by priority for ``auto``."""
    _load()
    if choice == "auto":
        return sorted(BACKENDS.values(), key=lambda e: e.priority)
    if choice not in BACKENDS:
        raise ConfigError(f"config error: slides.backend: unknown slide backend '{choice}' "
                          f"(choose from auto, {', '.join(sorted(BACKENDS))})")
    return [BACKENDS[choice]]


def open_backend(path: Path, entry: BackendEntry) -> Backend:
    return entry.open(path)


def _load() -> None:
    from . import (  # noqa: F401  (each registers itself)
        dicom_backend,
        image_backend,
        ometiff_backend,
        openslide_backend,
        tiffslide_backend,
    )
