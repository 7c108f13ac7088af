"""One reader over every registered slide backend (:mod:`wsi_mil.slide.backends`: openslide, tiffslide).

Regions come back as RGB uint8 numpy arrays; anything outside the slide is white on every backend.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from ..errors import SlideError, one_line
from .backends import backend_order, open_backend


class SlideReader:
    """A slide opened with one backend. ``mpp`` (µm/px at level 0) is set by :func:`open_slide`."""

    def __init__(self, path: str | Path, backend: str = "auto"):
        self.path = Path(path)
        if not self.path.is_file():
            raise SlideError(f"{self.path.name}: slide file not found: {self.path}")
        reasons = []
        for entry in backend_order(backend):
            try:
                # backends parse lazily: a truncated file can open, then fail on its first page
                opened = open_backend(self.path, entry)
                if not opened.level_dimensions:
                    opened.close()
                    raise SlideError("no image levels")
                self._backend, self.backend = opened, entry.name
                break
            except Exception as exc:  # each backend raises its own types
                reasons.append(f"{entry.name}: {one_line(exc)}")
        else:
            size = self.path.stat().st_size
            raise SlideError(f"{self.path.name}: cannot open slide ({size:,} bytes; truncated, corrupt or not a "
                             f"slide format: {'; '.join(reasons)})")
        self.level_dimensions: tuple[tuple[int, int], ...] = opened.level_dimensions
        self.level_downsamples: tuple[float, ...] = opened.level_downsamples
        self.properties: dict = opened.properties
        self.mpp: float | None = None
        self.mpp_source: str | None = None
        self.fast_thumbnail = True  # read_at_mpp may decode JPEG tiles pre-scaled (thumbnail.py)

    # -- geometry -------------------------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def level_mpp(self, level: int) -> float:
        if self.mpp is None:
            raise SlideError(f"{self.path.name}: mpp is not known")
        return self.mpp * self.level_downsamples[level]

    def best_level_for_mpp(self, target_mpp: float, tolerance: float = 0.01) -> int:
        """The level with the largest mpp that is still <= target (never coarser than asked)."""
        best = 0
        for level in range(self.level_count):
            if self.level_mpp(level) <= target_mpp * (1 + tolerance):
                if self.level_mpp(level) > self.level_mpp(best):
                    best = level
        return best

    # -- pixels ---------------------------------------------------------------------------------
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) for ``size`` pixels at ``level``, top-left ``location`` in level-0 px."""
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        # clip to the level so both backends agree on out-of-bounds (white)
        lx0, ly0 = math.floor(x / ds), math.floor(y / ds)
        cx0, cy0 = max(0, -lx0), max(0, -ly0)
        cx1, cy1 = min(w, lw - lx0), min(h, lh - ly0)
        out = np.full((h, w, 3), 255, np.uint8)
        if cx1 <= cx0 or cy1 <= cy0:
            return out
        inner = (x + round(cx0 * ds), y + round(cy0 * ds))
        part = self._read(inner, level, (cx1 - cx0, cy1 - cy0))
        out[cy0:cy1, cx0:cx1] = part
        return out

    def _read(self, location, level, size) -> np.ndarray:
        return self._backend.read(location, level, size)

    def deepzoom_source(self):
        """What ``openslide.deepzoom.DeepZoomGenerator`` reads for this slide (see :mod:`.backends`)."""
        return self._backend.deepzoom_source()

    def read_at_mpp(self, mpp: float, max_strip_px: int = 32_000_000) -> tuple[np.ndarray, float]:
        """The whole slide resampled to ``mpp`` µm/px, read from a suitable pyramid level in strips.

        Returns the image and the exact level-0 px per output px. Level 0 is never read whole
        unless it is itself the right resolution.
        """
        w0, h0 = self.dimensions
        scale = mpp / self.mpp  # level-0 px per output px
        out_w, out_h = max(1, round(w0 / scale)), max(1, round(h0 / scale))
        level = self.best_level_for_mpp(mpp * 1.5)
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        f = (w0 / out_w) / ds  # level px per output px
        factor = next((k for k in (8, 4, 2) if k <= f * 1.001), 1)
        if factor > 1 and self.fast_thumbnail:  # decode the level already scaled (see thumbnail.py)
            from .thumbnail import decode_level_scaled

            img = decode_level_scaled(self.path, lw, lh, factor)
            if img is not None:
                img = img[: lh // factor, : lw // factor]  # whole-pixel extent, like the level itself
                return cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_AREA), w0 / out_w
        rows_per_strip = max(1, int(max_strip_px / max(1, lw) / max(f, 1e-6)))
        out = np.empty((out_h, out_w, 3), np.uint8)
        for oy0 in range(0, out_h, rows_per_strip):
            oy1 = min(out_h, oy0 + rows_per_strip)
            ly0, ly1 = math.floor(oy0 * f), min(lh, math.ceil(oy1 * f))
            strip = self.read_region((0, round(ly0 * ds)), level, (lw, max(1, ly1 - ly0)))
            out[oy0:oy1] = cv2.resize(strip, (out_w, oy1 - oy0), interpolation=cv2.INTER_AREA)
        return out, w0 / out_w

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_slide(path, slides_cfg=None, mpp_overrides: dict | None = None, slide_id: str | None = None) -> SlideReader:
    """Open a slide with the configured backend and resolve its mpp (see :mod:`wsi_mil.slide.mpp`)."""
    from ..config import SlidesConfig
    from .mpp import resolve_mpp

    cfg = slides_cfg or SlidesConfig()
    reader = SlideReader(path, cfg.backend)
    try:
        reader.mpp, reader.mpp_source = resolve_mpp(
            reader, slide_id or Path(path).stem, mpp_overrides or {}, cfg.default_mpp
        )
    except Exception:
        reader.close()
        raise
    return reader
