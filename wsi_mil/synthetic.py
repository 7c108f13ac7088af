"""Synthetic H&E-like whole-slide images with ground truth, for tests, the demo and benchmarks.

A slide is described by low-resolution *design fields* on a physical grid (tissue, tumour, pen ink,
debris at ``DESIGN_MPP`` µm/px). Each pyramid tile is rendered on its own by warping those fields to the
tile and blending texture banks (normal vs tumour nuclei), so slides of 100k x 80k px and more are written
tile by tile without holding the image in memory. Files are Aperio-style tiled JPEG TIFFs (IFD 0 level 0,
IFD 1 a stripped thumbnail, then the reduced levels) that both openslide and tiffslide open.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from .atomic import atomic_path, write_csv
from .tiff import write_pyramid

DESIGN_MPP = 8.0
TEX_SIZE = 1024  # level-0 px per texture cell
N_VARIANTS = 4
WHITE = 255.0


@dataclass
class SyntheticSpec:
    width: int = 4096
    height: int = 4096
    mpp: float = 0.5
    tumour: bool = False
    pen: bool = False
    debris: bool = False
    seed: int = 0
    mpp_in_metadata: bool = True  # "MPP = " in the Aperio description
    resolution_tags: bool = True  # TIFF X/YResolution in centimetres
    objective_in_metadata: bool = True  # "AppMag = "
    tile: int = 256
    quality: int = 85
    level_factor: int = 2
    min_level_size: int = 512
    blank: bool = False  # glass only: no tissue at all
    tumour_share: float = 0.35  # with ``tumour``: the share of the tissue that is tumour


# -- design fields ------------------------------------------------------------------------------

def _smooth_noise(rng, shape, sigma) -> np.ndarray:
    """Unit-variance noise with correlation length ``sigma`` px: blurred on a coarse grid, then upsampled."""
    step = max(1.0, sigma / 3)
    small = (max(2, math.ceil(shape[0] / step)), max(2, math.ceil(shape[1] / step)))
    n = rng.standard_normal(small).astype(np.float32)
    n = cv2.GaussianBlur(n, (0, 0), sigmaX=max(sigma / step, 0.5), borderType=cv2.BORDER_REFLECT)
    n = cv2.resize(n, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    return (n - n.mean()) / (n.std() + 1e-6)


def _fill_small_holes(mask: np.ndarray, min_px: int) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), connectivity=8)
    small = stats[:, cv2.CC_STAT_AREA] < min_px
    small[0] = False
    return mask | small[labels]


def design_fields(spec: SyntheticSpec) -> dict[str, np.ndarray]:
    """Ground-truth fields on the design grid: float32 alphas in [0, 1] and the pen colour."""
    rng = np.random.default_rng(spec.seed)
    gw = max(8, math.ceil(spec.width * spec.mpp / DESIGN_MPP))
    gh = max(8, math.ceil(spec.height * spec.mpp / DESIGN_MPP))
    small = min(gw, gh)
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    cx, cy = gw * rng.uniform(0.42, 0.58), gh * rng.uniform(0.42, 0.58)
    rx, ry = gw * rng.uniform(0.28, 0.36), gh * rng.uniform(0.28, 0.36)
    window = 1.0 - ((xx - cx) / rx) ** 2 - ((yy - cy) / ry) ** 2
    tissue = (window + 0.45 * _smooth_noise(rng, (gh, gw), 0.08 * small)) > 0
    holes = _smooth_noise(rng, (gh, gw), 0.035 * small) > 2.0
    tissue &= ~holes
    hole_min = int(2 * 20000 / DESIGN_MPP**2)  # lumens smaller than 2x the default fill size are tissue
    tissue = _fill_small_holes(tissue, hole_min)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(tissue.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= int(2 * 20000 / DESIGN_MPP**2)
    keep[0] = False
    tissue = keep[labels] & (not spec.blank)
    fields = {"tissue": tissue.astype(np.float32)}

    tumour = np.zeros((gh, gw), bool)
    if spec.tumour and tissue.any():
        t = _smooth_noise(rng, (gh, gw), 0.07 * small)
        thr = np.quantile(t[tissue], 1 - spec.tumour_share)
        tumour = (t > thr) & tissue
    fields["tumour"] = tumour.astype(np.float32)

    pen = np.zeros((gh, gw), np.uint8)
    colour = np.zeros(3, np.float32)
    if spec.pen:
        colour = np.array(rng.choice([(30, 140, 60), (40, 60, 170), (20, 110, 40)]), np.float32)
        thick = max(2, int(round(120 / DESIGN_MPP)))
        for _ in range(2):
            pts = np.stack([rng.uniform(0.1, 0.9, 4) * gw, rng.uniform(0.1, 0.9, 4) * gh], 1).astype(np.int32)
            cv2.polylines(pen, [pts], False, 1, thickness=thick, lineType=cv2.LINE_AA)
    fields["pen"] = pen.astype(np.float32)
    fields["pen_colour"] = colour

    debris = np.zeros((gh, gw), np.uint8)
    if spec.debris:
        for _ in range(4):
            c = (int(rng.uniform(0.05, 0.95) * gw), int(rng.uniform(0.05, 0.95) * gh))
            r = max(2, int(rng.uniform(40, 90) / DESIGN_MPP))
            cv2.circle(debris, c, r, 1, -1)
    fields["debris"] = debris.astype(np.float32)
    return fields


# -- textures -----------------------------------------------------------------------------------

def _texture(rng, mpp: float, tumour: bool) -> np.ndarray:
    s = TEX_SIZE
    base = np.array([238, 165, 205], np.float32) + rng.normal(0, 4, 3)
    img = np.empty((s, s, 3), np.float32)
    img[:] = base
    low = _smooth_noise(rng, (s, s), 40 / mpp)[..., None]
    img += low * np.array([4, 10, 6], np.float32)
    for _ in range(int(s * s * mpp * mpp / 900)):  # stroma fibres
        x, y = rng.uniform(0, s, 2)
        ang, length = rng.uniform(0, np.pi), rng.uniform(20, 60) / mpp
        p2 = (int(x + length * np.cos(ang)), int(y + length * np.sin(ang)))
        cv2.line(img, (int(x), int(y)), p2, (225, 130, 185), max(1, int(1.2 / mpp)), cv2.LINE_AA)
    area_um2 = (s * mpp) ** 2
    if tumour:
        count, radius, colour, jitter = int(area_um2 / 90), (4.5, 7.0), (70, 30, 120), 25
    else:
        count, radius, colour, jitter = int(area_um2 / 320), (2.4, 3.4), (120, 75, 165), 15
    for _ in range(count):
        c = (int(rng.uniform(0, s)), int(rng.uniform(0, s)))
        r = rng.uniform(*radius) / mpp
        axes = (max(1, int(r)), max(1, int(r * rng.uniform(0.55 if tumour else 0.7, 1.0))))
        shade = rng.normal(0, jitter) + rng.normal(0, 4, 3)  # brightness varies, hue stays haematoxylin
        col = tuple(float(v) for v in np.clip(np.array(colour) + shade, 0, 255))
        cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), 0, 360, col, -1, cv2.LINE_AA)
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    img += rng.normal(0, 5, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.float32)


class Renderer:
    """Render any region of any level of a synthetic slide from its design fields and texture banks."""

    def __init__(self, spec: SyntheticSpec, fields: dict[str, np.ndarray] | None = None):
        self.spec = spec
        self.fields = fields if fields is not None else design_fields(spec)
        f = self.fields
        self.stack = np.ascontiguousarray(np.stack([f["tissue"], f["tumour"], f["pen"], f["debris"]], -1))
        content = (self.stack.max(-1) > 0).astype(np.uint8)
        self.content = cv2.dilate(content, np.ones((5, 5), np.uint8))
        rng = np.random.default_rng(spec.seed + 1_000_003)
        self.banks = {
            False: np.stack([_texture(rng, spec.mpp, False) for _ in range(N_VARIANTS)]),
            True: np.stack([_texture(rng, spec.mpp, True) for _ in range(N_VARIANTS)])
            if spec.tumour else None,
        }
        self._level_banks: dict[float, dict] = {}

    def _banks_at(self, ds: float) -> dict:
        if ds not in self._level_banks:
            size = max(1, int(round(TEX_SIZE / ds)))
            self._level_banks[ds] = {
                k: (None if b is None else np.stack([cv2.resize(v, (size, size), interpolation=cv2.INTER_AREA)
                                                     for v in b]))
                for k, b in self.banks.items()
            }
        return self._level_banks[ds]

    def _texture(self, bank: np.ndarray, x0: int, y0: int, w: int, h: int, ds: float) -> np.ndarray:
        size = bank.shape[1]
        cx0, cy0 = int(x0 * ds // TEX_SIZE), int(y0 * ds // TEX_SIZE)
        r0, c0 = y0 % size, x0 % size
        if r0 + h <= size and c0 + w <= size:  # one texture cell, no wrap: a plain slice
            v = (cx0 * 73856093 ^ cy0 * 19349663 ^ self.spec.seed) % len(bank)
            return bank[v, r0:r0 + h, c0:c0 + w]
        cols = np.arange(x0, x0 + w)
        rows = np.arange(y0, y0 + h)
        ccell, rcell = (cols * ds // TEX_SIZE).astype(np.int64), (rows * ds // TEX_SIZE).astype(np.int64)
        variant = (ccell[None, :] * 73856093 ^ rcell[:, None] * 19349663 ^ self.spec.seed) % len(bank)
        return bank[variant, (rows % size)[:, None], (cols % size)[None, :]]

    def region(self, x0: int, y0: int, w: int, h: int, ds: float) -> np.ndarray:
        """RGB uint8 for the box at (x0, y0) of size (w, h) in pixels of a level with downsample ``ds``."""
        f = self.spec.mpp * ds / DESIGN_MPP  # design px per level px
        gx0, gy0 = int(x0 * f) - 2, int(y0 * f) - 2
        gx1, gy1 = int((x0 + w) * f) + 3, int((y0 + h) * f) + 3
        win = self.content[max(gy0, 0):max(gy1, 0), max(gx0, 0):max(gx1, 0)]
        if win.size == 0 or not win.any():
            return np.full((h, w, 3), 255, np.uint8)
        m = np.array([[f, 0, (x0 + 0.5) * f - 0.5], [0, f, (y0 + 0.5) * f - 0.5]], np.float32)
        a = cv2.warpAffine(self.stack, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        tissue, tumour, pen, debris = (a[..., i:i + 1] for i in range(4))
        banks = self._banks_at(ds)
        img = self._texture(banks[False], x0, y0, w, h, ds)
        if banks[True] is not None and tumour.max() > 0:
            img = img + (self._texture(banks[True], x0, y0, w, h, ds) - img) * tumour
        img = WHITE + (img - WHITE) * tissue
        if pen.max() > 0:
            img = img + (self.fields["pen_colour"] - img) * (0.85 * pen)
        if debris.max() > 0:
            img = img + (np.float32(25.0) - img) * debris
        return np.clip(img, 0, 255).astype(np.uint8)


# -- writing ------------------------------------------------------------------------------------

def level_downsamples(spec: SyntheticSpec) -> list[int]:
    out, ds = [1], spec.level_factor
    while max(spec.width, spec.height) / ds >= spec.min_level_size:
        out.append(ds)
        ds *= spec.level_factor
    return out


def _tiles(renderer: Renderer, width: int, height: int, ds: int, tile: int):
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            yield renderer.region(x, y, tile, tile, ds)


def write_slide(path: str | Path, spec: SyntheticSpec, truth_dir: str | Path | None = None) -> dict:
    """Write a synthetic slide (atomically) and, optionally, its ground-truth masks. Returns the truth info."""
    path = Path(path)
    renderer = Renderer(spec)
    w0, h0 = spec.width, spec.height
    levels = level_downsamples(spec)
    tds = max(w0, h0) / 768
    thumb = renderer.region(0, 0, max(1, round(w0 / tds)), max(1, round(h0 / tds)), tds)
    description = "|".join(p for p in (
        f"AppMag = {10.0 / spec.mpp:g}" if spec.objective_in_metadata else "",
        f"MPP = {spec.mpp:.6f}" if spec.mpp_in_metadata else "",
        "Source = wsi_mil synthetic") if p)
    write_pyramid(path, w0, h0, levels, lambda ds, w, h, t: _tiles(renderer, w, h, ds, t), thumb, spec.mpp,
                  description, spec.tile, spec.quality, spec.resolution_tags)
    info = {"slide_id": path.stem, "width": w0, "height": h0, "mpp": spec.mpp, "design_mpp": DESIGN_MPP,
            "levels": levels, "spec": asdict(spec)}
    if truth_dir is not None:
        write_truth(renderer.fields, Path(truth_dir), path.stem, info)
    return info


def write_truth(fields: dict, truth_dir: Path, slide_id: str, info: dict) -> None:
    truth_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tissue", "tumour", "pen"):
        with atomic_path(truth_dir / f"{slide_id}.{name}.png") as tmp:
            cv2.imwrite(str(tmp), (fields[name] > 0.5).astype(np.uint8) * 255)
    with atomic_path(truth_dir / f"{slide_id}.json") as tmp:
        tmp.write_text(json.dumps(info, indent=1))


def load_truth(truth_dir: str | Path, slide_id: str, name: str) -> tuple[np.ndarray, float]:
    """A ground-truth mask (bool) and its µm/px."""
    mask = cv2.imread(str(Path(truth_dir) / f"{slide_id}.{name}.png"), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise FileNotFoundError(f"no {name} truth for {slide_id} in {truth_dir}")
    return mask > 127, DESIGN_MPP


def make_cohort(out_dir: str | Path, n_slides: int = 6, width: int = 3072, height: int = 3072,
                mpp: float = 0.5, seed: int = 0, pen_every: int = 3, quality: int = 85) -> Path:
    """A folder of slides (half with tumour), ground truth under ``truth/`` and ``labels.csv``.

    Two slides of the same label share each patient id, so patient-grouped splits are exercised.
    """
    out_dir = Path(out_dir)
    slides_dir = out_dir / "slides"
    slides_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_slides):
        positive = i % 2 == 1
        sid = f"syn_{i:03d}"
        spec = SyntheticSpec(width=width, height=height, mpp=mpp, tumour=positive, seed=seed * 1000 + i,
                             pen=pen_every > 0 and i % pen_every == 2, debris=i % 4 == 3, quality=quality)
        path = slides_dir / f"{sid}.svs"
        if not path.exists():
            write_slide(path, spec, out_dir / "truth")
        rows.append({"slide_id": sid, "label": "tumour" if positive else "normal",
                     "patient_id": f"P{(i // 4) * 2 + i % 2:03d}"})
    write_csv(out_dir / "labels.csv", rows)
    return out_dir


def make_survival_cohort(out_dir: str | Path, n_slides: int = 24, width: int = 2048, height: int = 2048,
                         mpp: float = 0.5, seed: int = 0, beta: float = 5.0, censoring: float = 0.3) -> Path:
    """Slides whose survival depends on their tumour burden, for ``make demo TASK=survival``.

    Slide i has a tumour share b_i of its tissue (b = 0 for a quarter of the slides, else U(0.1, 0.6)),
    and a true hazard h_i = 0.05 exp(beta * b_i) per month. Event times are exponential with that hazard;
    censoring times are exponential with one rate for the cohort, chosen so that about ``censoring`` of
    the slides are censored (exactly: the expected fraction h_c / (h_c + h_i), averaged, equals it).
    ``labels.csv`` has ``slide_id, time, event, patient_id`` (one slide per patient);
    ``survival_truth.csv`` the measured burden (the tumour truth mask over the tissue truth mask) and the
    true log hazard, from which the oracle c-index is computed.
    """
    out_dir = Path(out_dir)
    slides_dir = out_dir / "slides"
    slides_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    share = np.where(np.arange(n_slides) % 4 == 0, 0.0, rng.uniform(0.1, 0.6, n_slides))
    log_hazard = np.log(0.05) + beta * share
    hazard = np.exp(log_hazard)
    lo, hi = 1e-6, 10.0  # the censoring rate whose expected censored share is ``censoring`` (bisection)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.mean(mid / (mid + hazard)) < censoring else (lo, mid)
    t_event, t_censor = rng.exponential(1 / hazard), rng.exponential(1 / lo, n_slides)
    rows, truth = [], []
    for i in range(n_slides):
        sid = f"surv_{i:03d}"
        spec = SyntheticSpec(width=width, height=height, mpp=mpp, tumour=bool(share[i] > 0), tumour_share=float(max(share[i], 0.01)),
                             seed=seed * 1000 + i, debris=i % 5 == 3)
        path = slides_dir / f"{sid}.svs"
        if not path.exists():
            write_slide(path, spec, out_dir / "truth")
        tissue, _ = load_truth(out_dir / "truth", sid, "tissue")
        tumour, _ = load_truth(out_dir / "truth", sid, "tumour")
        event = int(t_event[i] <= t_censor[i])
        rows.append({"slide_id": sid, "time": f"{min(t_event[i], t_censor[i]):.3f}", "event": event,
                     "patient_id": f"S{i:03d}"})
        truth.append({"slide_id": sid, "burden": f"{tumour.sum() / max(1, tissue.sum()):.4f}",
                      "log_hazard": f"{log_hazard[i]:.6f}"})
    write_csv(out_dir / "labels.csv", rows)
    write_csv(out_dir / "survival_truth.csv", truth)
    return out_dir
