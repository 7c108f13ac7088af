"""``patches/<slide_id>.h5``, written by tile and read by extract, heatmap, the viewer and the exporters.

Datasets: ``coords`` (N, 2) int64 level-0 top-left (x, y) in row-major grid order, ``grid_index`` (N, 2)
grid cell (col, row), ``tissue_fraction`` (N,), and ``tissue_mask`` (H, W) uint8 at ``mpp`` with
``level0_per_px``. ``coords``' attributes are a :class:`PatchSpec`: the fields CLAM and TRIDENT read
(``patch_size``, ``patch_level``, ``downsample``, ``level_dim``, ``level0_magnification``,
``target_magnification``, ``overlap``; see :mod:`wsi_mil.tiling`) and our own physical description.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import h5py
import numpy as np

from ..h5io import attrs_of, write_h5


@dataclass(frozen=True)
class PatchSpec:
    """How a slide's patches were laid out and are read: the typed attributes of ``coords``."""

    patch_size: int  # edge at patch_level (CLAM's meaning; TRIDENT's with the magnifications below)
    patch_level: int
    patch_size_level0: int
    level0_width: int
    level0_height: int
    patch_size_level: int = 0  # = patch_size; our name for it
    downsample: float = 1.0  # of patch_level
    level_dim: tuple[int, int] = (0, 0)
    name: str = ""
    level0_magnification: float = 0.0
    target_magnification: float = 0.0
    overlap: int = 0  # px at patch_level (TRIDENT)
    patch_size_target: int = 0  # tiling.patch_size: the edge at target_mpp
    step_level0: float = 0.0
    target_mpp: float = 0.0
    slide_mpp: float = 0.0
    mpp_source: str = ""
    overlap_fraction: float = 0.0
    min_tissue_fraction: float = 0.25
    grid_cols: int = 0
    grid_rows: int = 0
    backend: str = "auto"
    tissue_source: str = ""
    tissue_mpp: float = 0.0
    tissue_params: dict = field(default_factory=dict)
    slide_path: str = ""
    wsi_mil_version: str = ""

    def to_attrs(self) -> dict:
        out = asdict(self)
        out["downsample"] = np.array([self.downsample, self.downsample], np.float64)
        out["level_dim"] = np.array(self.level_dim, np.int64)
        out["tissue_params"] = json.dumps(self.tissue_params, sort_keys=True)
        return out

    @classmethod
    def from_attrs(cls, attrs: dict) -> PatchSpec:
        """The record of a file's ``coords`` attributes (files of older versions: missing fields default)."""
        known = {f.name: f for f in fields(cls)}
        values = {k: v for k, v in attrs.items() if k in known}
        if "downsample" in values:
            values["downsample"] = float(np.ravel(values["downsample"])[0])
        if "level_dim" in values:
            values["level_dim"] = tuple(int(v) for v in np.ravel(values["level_dim"])[:2])
        if isinstance(values.get("tissue_params"), str):
            values["tissue_params"] = json.loads(values["tissue_params"] or "{}")
        for k in ("patch_size", "patch_level", "patch_size_level0", "level0_width", "level0_height",
                  "patch_size_level", "overlap", "patch_size_target", "grid_cols", "grid_rows"):
            if k in values:
                values[k] = int(values[k])
        for k in ("name", "mpp_source", "backend", "tissue_source", "slide_path", "wsi_mil_version"):
            if k in values:
                values[k] = str(values[k])
        spec = cls(**values)
        if not spec.patch_size_level:
            spec = cls(**{**values, "patch_size_level": spec.patch_size})
        return spec


@dataclass(frozen=True)
class TissueMask:
    """The tissue mask the patches were filtered by: bool (H, W), ``level0_per_px`` level-0 px per pixel."""

    mask: np.ndarray
    mpp: float
    level0_per_px: float


def write_patch_file(path: str | Path, slide_id: str, coords: np.ndarray, grid_index: np.ndarray,
                     tissue_fraction: np.ndarray, spec: PatchSpec, tissue: TissueMask) -> None:
    write_h5(path, {"coords": coords, "grid_index": grid_index, "tissue_fraction": tissue_fraction,
                    "tissue_mask": tissue.mask.astype(np.uint8)},
             {"coords": spec.to_attrs(),
              "tissue_mask": {"mpp": float(tissue.mpp), "level0_per_px": float(tissue.level0_per_px)},
              "/": {"slide_id": slide_id, "stage": "tile"}},
             compress=("tissue_mask",))


def read_patch_spec(path: str | Path) -> PatchSpec:
    with h5py.File(path, "r") as fh:
        return PatchSpec.from_attrs(attrs_of(fh["coords"]))


def read_patch_file(path: str | Path) -> tuple[np.ndarray, PatchSpec]:
    """(coords (N, 2) int64, spec)."""
    with h5py.File(path, "r") as fh:
        return fh["coords"][:].astype(np.int64).reshape(-1, 2), PatchSpec.from_attrs(attrs_of(fh["coords"]))


def read_grid_index(path: str | Path) -> np.ndarray:
    with h5py.File(path, "r") as fh:
        return fh["grid_index"][:].astype(np.int64).reshape(-1, 2)


def read_tissue_mask(path: str | Path) -> TissueMask | None:
    """The patch file's tissue mask, or None for a file written without one."""
    with h5py.File(path, "r") as fh:
        if "tissue_mask" not in fh:
            return None
        ds = fh["tissue_mask"]
        spec = PatchSpec.from_attrs(attrs_of(fh["coords"]))
        mask = ds[:] > 0
        per_px = float(ds.attrs.get("level0_per_px", spec.level0_width / max(1, mask.shape[1])))
        return TissueMask(mask, float(ds.attrs.get("mpp", spec.tissue_mpp)), per_px)
