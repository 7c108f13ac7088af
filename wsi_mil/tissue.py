"""Tissue masks at low resolution (torch-free).

Saturation (or grey) Otsu after a median blur, pen ink and black debris removed, morphological closing,
small holes filled and small objects removed. Every size is physical (µm, µm²) and converted to pixels
at the mask's own resolution, so a 2 mm biopsy and a 25 mm resection are treated alike.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .config import TissueConfig
from .errors import WsiMilError, one_line
from .userfiles import read_json


def _px_area(area_um2: float, mpp: float) -> int:
    return int(round(area_um2 / (mpp * mpp)))


PEN_HUES = ((35, 95, 50), (96, 128, 90), (0, 8, 140), (172, 180, 140))  # (h0, h1, s above): green, blue, red


def pen_and_debris_mask(rgb: np.ndarray, cfg: TissueConfig, hsv: np.ndarray | None = None) -> np.ndarray:
    """Pixels of red, green or blue marker ink, and (optionally) black debris, on HSV (H in [0, 180)):
    green 35 <= h <= 95 and s > 50; blue 95 < h <= 128 and s > 90; red h <= 8 or h >= 172, s > 140 and
    v < 235; black v < 45. A hue lookup gives each pixel its saturation threshold (255 where no ink
    hue: s > 255 never holds), so each rule is one pass of cv2 lookups and comparisons."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV) if hsv is None else hsv
    return _ink_and_debris(*cv2.split(hsv), cfg)


def _ink_and_debris(h: np.ndarray, s: np.ndarray, v: np.ndarray, cfg: TissueConfig) -> np.ndarray:
    out = np.zeros(h.shape, np.uint8)
    if cfg.remove_pen:
        s_above = np.full(256, 255, np.uint8)
        for h0, h1, above in PEN_HUES:
            s_above[h0:h1 + 1] = above
        red = np.zeros(256, np.uint8)
        red[0:9], red[172:181] = 255, 255
        ink = cv2.compare(s, cv2.LUT(h, s_above), cv2.CMP_GT)
        bright_red = cv2.bitwise_and(cv2.LUT(h, red), cv2.compare(v, 234, cv2.CMP_GT))
        out = cv2.bitwise_and(ink, cv2.bitwise_not(bright_red))
    if cfg.remove_black:
        cv2.bitwise_or(out, cv2.compare(v, 44, cv2.CMP_LE), dst=out)
    if out.any():
        out = cv2.dilate(out, np.ones((3, 3), np.uint8))
    return out.astype(bool)


def _remove_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    """``mask`` without its 8-connected components smaller than ``min_px`` (uint8 0/1 in, uint8 out).

    A full labelling pass costs ~30 ms on a 3125 x 2500 mask, and usually finds nothing to remove. The
    component outlines (one ``findContours``, ~3 ms) bound each component from below: the distinct pixels
    of its outer boundary are its own pixels, so a component whose boundary has ``min_px`` of them is big
    enough. Only the others are counted exactly, by labelling their own bounding box. Many candidates (a
    speckled mask) fall back to one labelling pass over the image."""
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    if min_px <= 1:
        return mask
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return mask
    outer = [c.reshape(-1, 2) for c, h in zip(contours, hierarchy[0]) if h[3] == -1]
    candidates = [c for c in outer if len(c) < min_px and len(np.unique(c, axis=0)) < min_px]
    if not candidates:
        return mask
    if len(candidates) > 256:
        return _remove_small_by_labels(mask, min_px)
    out = mask.copy()
    for c in candidates:
        x0, y0 = c.min(0)
        x1, y1 = c.max(0) + 1
        _, labels, stats, _ = cv2.connectedComponentsWithStats(mask[y0:y1, x0:x1], connectivity=8)
        own = labels[c[0, 1] - y0, c[0, 0] - x0]  # a boundary pixel is the component's own pixel
        if stats[own, cv2.CC_STAT_AREA] < min_px:
            out[y0:y1, x0:x1][labels == own] = 0
    return out


def _remove_small_by_labels(mask: np.ndarray, min_px: int) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = (stats[:, cv2.CC_STAT_AREA] >= min_px).astype(np.uint8)
    keep[0] = 0
    return np.take(keep, labels)


def detect_tissue(rgb: np.ndarray, mpp: float, cfg: TissueConfig | None = None) -> np.ndarray:
    """Boolean tissue mask for an RGB thumbnail at ``mpp`` µm/px. Pure: numpy in, numpy out."""
    cfg = cfg or TissueConfig()
    img = cv2.medianBlur(rgb, cfg.median_ksize) if cfg.median_ksize > 1 else rgb
    planes = cv2.split(cv2.cvtColor(img, cv2.COLOR_RGB2HSV))  # contiguous H, S, V: no strided copies below
    if cfg.method == "saturation":
        channel = planes[1]
        thr, _ = cv2.threshold(channel, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        mask = channel > max(thr, cfg.threshold_min)
    else:
        channel = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        thr, _ = cv2.threshold(channel, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        mask = channel < min(thr, 255 - cfg.threshold_min)
    mask = mask.view(np.uint8)  # 0/1 from here on: cv2 works on it without copies
    if cfg.remove_pen or cfg.remove_black:
        mask &= ~_ink_and_debris(*planes, cfg)
    radius = int(round(cfg.close_um / mpp / 2))
    if radius >= 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    mask = 1 - _remove_small(1 - mask, _px_area(cfg.max_hole_area_um2, mpp) + 1)  # fill holes below the size
    return _remove_small(mask, _px_area(cfg.min_area_um2, mpp)).view(bool)


# -- GeoJSON (QuPath) ---------------------------------------------------------------------------

TISSUE_COLOR = (0, 170, 0)


def qupath_class(name: str, color: tuple[int, int, int]) -> dict:
    """A classification QuPath's reader accepts: its PathClass type adapter takes a plain string, or an
    object with ``name`` (or ``names``) *and* ``color``; ``{"name": ...}`` alone is refused."""
    return {"name": str(name), "color": [int(c) for c in color]}


def mask_to_geojson(mask: np.ndarray, scale: float, name: str = "Tissue") -> dict:
    """Tissue polygons (with holes) in level-0 pixels, as a QuPath-importable FeatureCollection."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    features = []
    if hierarchy is not None:
        hierarchy = hierarchy[0]

        def ring(c: np.ndarray) -> list[list[float]]:
            pts = (c.reshape(-1, 2).astype(np.float64) + 0.5) * scale
            pts = [[round(float(x), 1), round(float(y), 1)] for x, y in pts]
            return pts + [pts[0]]

        for i, c in enumerate(contours):
            if hierarchy[i][3] != -1 or len(c) < 3:
                continue  # holes are attached to their parent below
            rings = [ring(c)]
            child = hierarchy[i][2]
            while child != -1:
                if len(contours[child]) >= 3:
                    rings.append(ring(contours[child]))
                child = hierarchy[child][0]
            features.append({
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {"objectType": "annotation", "classification": qupath_class(name, TISSUE_COLOR)},
            })
    return {"type": "FeatureCollection", "features": features}


def _polygons(obj) -> list[list]:
    """All polygons (each a list of rings) in a GeoJSON object, FeatureCollection, Feature or list."""
    if isinstance(obj, list):
        return [p for item in obj for p in _polygons(item)]
    kind = obj.get("type")
    if kind == "FeatureCollection":
        return _polygons(obj.get("features", []))
    if kind == "Feature":
        return _polygons(obj.get("geometry") or {})
    if kind == "Polygon":
        return [obj["coordinates"]]
    if kind == "MultiPolygon":
        return list(obj["coordinates"])
    if kind == "GeometryCollection":
        return _polygons(obj.get("geometries", []))
    return []


def geojson_to_mask(geojson: dict | list, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Rasterise level-0 polygons (holes honoured) onto a mask of ``shape`` at ``scale`` level-0 px per px."""
    mask = np.zeros(shape, np.uint8)
    for rings in _polygons(geojson):
        pts = [np.round(np.asarray(r, np.float64) / scale - 0.5).astype(np.int32) for r in rings]
        cv2.fillPoly(mask, pts[:1], 1)
        if len(pts) > 1:
            cv2.fillPoly(mask, pts[1:], 0)
    return mask.astype(bool)


def load_user_geojson(folder: Path | None, slide_id: str, shape: tuple[int, int], scale: float) -> np.ndarray | None:
    """The mask drawn by a user-edited ``<slide_id>.geojson`` (QuPath export: classification as a string or
    an object), or None when there is none. A file that cannot be used is one line naming it."""
    if folder is None:
        return None
    for ext in (".geojson", ".json"):
        path = Path(folder) / f"{slide_id}{ext}"
        if path.is_file():
            data = read_json(path, "tissue GeoJSON")
            try:
                mask = geojson_to_mask(data, shape, scale)
            except (KeyError, TypeError, ValueError, AttributeError, cv2.error) as exc:
                raise WsiMilError(f"tissue GeoJSON {path.name}: not usable polygons ({one_line(exc)})") from None
            return mask
    return None
