"""Resolve a slide's level-0 µm/px. The exact value is always used; it is never binned to a magnification.

Order: override CSV > reader mpp properties > TIFF resolution tags (with unit) > 10/objective power
(with a warning) > ``slides.default_mpp``. Otherwise the slide fails with a message naming both fixes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import SlideError
from ..userfiles import read_csv_rows

log = logging.getLogger(__name__)
PLAUSIBLE = (0.02, 50.0)  # µm/px; outside this a tag is a placeholder (e.g. 72 dpi), not a scan resolution


def _plausible(v: float | None) -> bool:
    return v is not None and PLAUSIBLE[0] <= v <= PLAUSIBLE[1]


def _float(value) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if f > 0 else None


def load_mpp_csv(path: str | Path | None) -> dict[str, float]:
    """Per-slide overrides: a CSV with columns ``slide_id,mpp``."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"slides.mpp_csv not found: {path}")
    rows = read_csv_rows(path, "slides.mpp_csv")
    if rows and not {"slide_id", "mpp"} <= set(rows[0]):
        raise SlideError(f"{path.name}: mpp CSV needs columns slide_id,mpp")
    out = {}
    for row in rows:
        value = _float(row["mpp"])
        if value is None:
            raise SlideError(f"{path.name}: bad mpp {row['mpp']!r} for slide {row['slide_id']}")
        out[row["slide_id"]] = value
    return out


def _from_properties(props: dict) -> float | None:
    for prefix in ("openslide", "tiffslide", "dicom", "ome"):
        x, y = _float(props.get(f"{prefix}.mpp-x")), _float(props.get(f"{prefix}.mpp-y"))
        if _plausible(x):
            return (x + y) / 2 if _plausible(y) else x
    return None


def _from_tiff_tags(path: Path) -> float | None:
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            xres = page.tags.get("XResolution")
            unit = page.tags.get("ResolutionUnit")
            if xres is None or unit is None:
                return None
            num, den = xres.value
            per_unit = num / den if den else 0
            unit_um = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
            if not per_unit or unit_um is None:
                return None
            value = unit_um / per_unit
            return value if _plausible(value) else None
    except Exception:
        return None


def _from_objective(props: dict) -> float | None:
    for key in ("openslide.objective-power", "tiffslide.objective-power", "aperio.AppMag"):
        power = _float(props.get(key))
        if power:
            return 10.0 / power
    return None


def resolve_mpp(reader, slide_id: str, overrides: dict[str, float], default_mpp: float | None):
    """Return ``(mpp, source)`` for an open :class:`SlideReader`."""
    if slide_id in overrides:
        return overrides[slide_id], "override_csv"
    value = _from_properties(reader.properties)
    if value:
        return value, "properties"
    value = _from_tiff_tags(reader.path)
    if value:
        return value, "tiff_resolution"
    value = _from_objective(reader.properties)
    if value:
        log.warning("%s: mpp taken from objective power as %.4f µm/px (10/power); check it", slide_id, value)
        return value, "objective_power"
    if default_mpp:
        return default_mpp, "default_mpp"
    raise SlideError(
        f"{slide_id}: no mpp (µm/px) in the slide's metadata; add a row to the CSV named by "
        f"slides.mpp_csv (columns slide_id,mpp) or set slides.default_mpp"
    )
