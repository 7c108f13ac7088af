"""One reader over every registered slide backend (:mod:`wsi_mil.slide.backends`: openslide, tiffslide).

Regions come back as RGB uint8 numpy arrays; anything outside the slide is white on every backend.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from ..errors import SlideError, one_line
from .backends import NotThisFormat, backend_order, open_backend
from .dicomweb import is_dicomweb, slide_exists

# formats no installed reader opens: suffix -> (what it is, what would read it)
UNREADABLE = {
    ".vsi": ("Olympus/Evident VSI", "Bio-Formats (bfconvert) or QuPath"),
    ".czi": ("Zeiss CZI", "Bio-Formats (bfconvert), pylibCZIrw or QuPath"),
    ".isyntax": ("Philips iSyntax", "the Philips pathology SDK"),
    ".lif": ("Leica LIF", "Bio-Formats (bfconvert)"),
    ".nd2": ("Nikon ND2", "Bio-Formats (bfconvert) or nd2"),
}


def unreadable_format(path: Path) -> str | None:
    """The one-line reason for a format no backend here reads, with what would read it; None otherwise."""
    kind = UNREADABLE.get(path.suffix.lower())
    if kind is None:
        return None
    return (f"{kind[0]} is not a format wsi_mil reads (OpenSlide, tiffslide, DICOM and flat images are); "
            f"convert it with {kind[1]} to pyramidal TIFF or OME-TIFF, or to DICOM WSI (e.g. wsidicomizer)")


class SlideReader:
    """A slide opened with one backend. ``mpp`` (µm/px at level 0) is set by :func:`open_slide`."""

    def __init__(self, path: str | Path, backend: str = "auto"):
        self.path = Path(path)
        remote = is_dicomweb(self.path)
        if not slide_exists(self.path):  # a file, a folder holding one DICOM WSI series, or a DICOMweb series
            raise SlideError(f"{self.path.name}: slide file not found: {self.path}")
        unreadable = unreadable_format(self.path)
        if unreadable and backend == "auto":
            raise SlideError(f"{self.path.name}: {unreadable}")
        reasons = []
        for entry in backend_order(backend):
            if (remote or self.path.is_dir()) and entry.name != "dicom" and backend == "auto":
                continue  # a folder or a DICOMweb locator is a DICOM series or nothing
            try:
                # backends parse lazily: a truncated file can open, then fail on its first page
                opened = open_backend(self.path, entry)
                if not opened.level_dimensions:
                    opened.close()
                    raise SlideError("no image levels")
                self._backend, self.backend = opened, entry.name
                break
            except NotThisFormat:
                continue
            except Exception as exc:  # each backend raises its own types
                reasons.append(f"{entry.name}: {one_line(exc)}")
        else:
            if remote:
                raise SlideError(f"{self.path.name}: {'; '.join(reasons) or 'not read'}")
            if self.path.is_dir():
                raise SlideError(f"{self.path.name}: not a DICOM WSI folder (no readable series: {'; '.join(reasons)})")
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
        if factor > 1:
            img = None
            if self.fast_thumbnail:  # decode the level already scaled (see thumbnail.py)
                from .thumbnail import decode_level_scaled

                img = decode_level_scaled(self.path, lw, lh, factor)
            if img is None:  # any other container: the same geometry from exact block means
                img = self._level_reduced(level, factor, max_strip_px)
            img = img[: lh // factor, : lw // factor]  # whole blocks only, on both paths
            return cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_AREA), w0 / out_w
        rows_per_strip = max(1, int(max_strip_px / max(1, lw) / max(f, 1e-6)))
        out = np.empty((out_h, out_w, 3), np.uint8)
        for oy0 in range(0, out_h, rows_per_strip):
            oy1 = min(out_h, oy0 + rows_per_strip)
            ly0, ly1 = math.floor(oy0 * f), min(lh, math.ceil(oy1 * f))
            strip = self.read_region((0, round(ly0 * ds)), level, (lw, max(1, ly1 - ly0)))
            out[oy0:oy1] = cv2.resize(strip, (out_w, oy1 - oy0), interpolation=cv2.INTER_AREA)
        return out, w0 / out_w

    def _level_reduced(self, level: int, factor: int, max_strip_px: int) -> np.ndarray:
        """The level downsampled by the integer ``factor`` as means of factor x factor blocks (what a JPEG
        decoded at 1/factor gives, up to rounding), read in strips: a slide in any container (DICOM,
        OME-TIFF, flat TIFF, PNG) gets the thumbnail, hence the tissue mask, its SVS twin gets."""
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        bw, bh = lw // factor, lh // factor
        rows = max(factor, (max_strip_px // max(1, lw)) // factor * factor)
        out = np.empty((bh, bw, 3), np.uint8)
        for y0 in range(0, bh * factor, rows):
            y1 = min(bh * factor, y0 + rows)
            strip = self.read_region((0, round(y0 * ds)), level, (bw * factor, y1 - y0))
            out[y0 // factor:y1 // factor] = cv2.resize(strip, (bw, (y1 - y0) // factor), interpolation=cv2.INTER_AREA)
        return out

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
