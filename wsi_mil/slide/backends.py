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
