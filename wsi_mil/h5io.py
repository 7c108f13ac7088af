"""HDF5 layouts shared with CLAM / TRIDENT / torchmil readers.

``coords`` (N, 2) int64 level-0 top-left (x, y); ``features`` (N, D). Attributes describe themselves.
Every file is written to a temp name and renamed, so an existing file is complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from .atomic import atomic_path


def _attr(value):
    if value is None:
        return "none"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, Path):
        return str(value)
    return value


def write_h5(path: str | Path, datasets: dict[str, np.ndarray], attrs: dict[str, dict] | None = None,
             chunk_rows: int | None = None) -> None:
    """Write ``datasets`` (name -> array) with per-dataset ``attrs``, atomically."""
    attrs = attrs or {}
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=True) as fh:
        for name, data in datasets.items():
            data = np.asarray(data)
            chunks = None
            if chunk_rows and data.ndim >= 1 and data.shape[0] > 0:
                chunks = (min(chunk_rows, data.shape[0]), *data.shape[1:])
            ds = fh.create_dataset(name, data=data, chunks=chunks)
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
