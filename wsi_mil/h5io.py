"""HDF5 layouts shared with CLAM / TRIDENT / torchmil readers.

``coords`` (N, 2) int64 level-0 top-left (x, y); ``features`` (N, D). Attributes describe themselves.
Every file is written to a temp name and renamed, so an existing file is complete.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import h5py
import numpy as np

from .atomic import write_bytes
from .errors import WsiMilError

PATCH_ATTRS = ("patch_size", "patch_level", "patch_size_level0", "patch_size_level", "level0_width", "level0_height")


def _attr(value):
    if value is None:
        return "none"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, Path):
        return str(value)
    return value


def write_h5(path: str | Path, datasets: dict[str, np.ndarray], attrs: dict[str, dict] | None = None,
             chunk_rows: int | None = None, compress: tuple[str, ...] = ()) -> None:
    """Write ``datasets`` (name -> array) with per-dataset ``attrs``, atomically.

    The file is built in memory (HDF5's core driver) and its bytes written with plain file I/O: a full
    disk is then an ordinary ``OSError`` for this slide, never an HDF5 handle that cannot close (which
    crashed the interpreter at exit).
    """
    attrs = attrs or {}
    with h5py.File(io.BytesIO(), "w", track_order=True) as fh:
        _fill(fh, datasets, attrs, chunk_rows, compress)
        fh.flush()
        image = fh.id.get_file_image()
    write_bytes(path, image)


def _fill(fh: h5py.File, datasets: dict[str, np.ndarray], attrs: dict[str, dict], chunk_rows: int | None,
          compress: tuple[str, ...] = ()) -> None:
    for name, data in datasets.items():
        data = np.asarray(data)
        chunks = None
        if chunk_rows and data.ndim >= 1 and data.shape[0] > 0:
            chunks = (min(chunk_rows, data.shape[0]), *data.shape[1:])
        extra = {"compression": "gzip", "compression_opts": 1, "shuffle": True} if name in compress and data.size else {}
        ds = fh.create_dataset(name, data=data, chunks=chunks or (True if extra else None), **extra)
        for key, value in attrs.get(name, {}).items():
            ds.attrs[key] = _attr(value)
    for key, value in attrs.get("/", {}).items():
        fh.attrs[key] = _attr(value)


def attrs_of(obj) -> dict:
    """HDF5 attributes as plain Python values."""
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in obj.attrs.items()}


def read_coords(path: str | Path) -> tuple[np.ndarray, dict]:
    with h5py.File(path, "r") as fh:
        return fh["coords"][:].astype(np.int64).reshape(-1, 2), attrs_of(fh["coords"])


def _bad(path: Path, why: str) -> WsiMilError:
    return WsiMilError(f"{Path(path).name}: {why}")


def check_patch_file(path: str | Path) -> int:
    """Number of patches in a complete patch file; a one-line error for anything else."""
    try:
        with h5py.File(path, "r") as fh:
            ds = fh["coords"]
            if ds.ndim != 2 or ds.shape[1] != 2:
                raise _bad(path, f"coords has shape {ds.shape}, expected (N, 2)")
            missing = [k for k in PATCH_ATTRS if k not in ds.attrs]
            if missing:
                raise _bad(path, f"coords lacks attributes {', '.join(missing)}")
            return int(ds.shape[0])
    except (OSError, KeyError) as exc:
        raise _bad(path, f"not a complete patch file ({str(exc).splitlines()[0][:120]})") from None


def check_features_file(path: str | Path) -> tuple[int, int]:
    """(N, D) of a complete features file: features (N, D) and coords (N, 2) that agree."""
    try:
        with h5py.File(path, "r") as fh:
            f, c = fh["features"], fh["coords"]
            if f.ndim != 2 or c.ndim != 2 or c.shape[1] != 2 or f.shape[0] != c.shape[0]:
                raise _bad(path, f"features {f.shape} and coords {c.shape} do not agree")
            dim = f.attrs.get("feature_dim")
            if dim is not None and int(dim) != f.shape[1]:
                raise _bad(path, f"features are {f.shape[1]}-d but feature_dim says {int(dim)}")
            if f.shape[0]:
                f[-1]  # the last chunk is readable (a truncated file fails here)
            return int(f.shape[0]), int(f.shape[1])
    except (OSError, KeyError) as exc:
        raise _bad(path, f"not a complete features file ({str(exc).splitlines()[0][:120]})") from None
