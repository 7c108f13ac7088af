"""``features/<encoder_id>/<slide_id>.h5``, written by extract and read by train, predict, heatmap and the
exporters (and by CLAM's and TRIDENT's h5 readers: ``features`` (N, D), ``coords`` (N, 2)).

``features``' attributes are a :class:`FeatureSpec`; ``coords`` carries the patch file's
:class:`~wsi_mil.formats.patches.PatchSpec`. Files another tool wrote (no attributes) are read too: their
encoder id is their folder's name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import h5py
import numpy as np

from ..errors import WsiMilError
from ..h5io import attrs_of, write_h5
from .patches import PatchSpec


@dataclass(frozen=True)
class FeatureSpec:
    """What produced a bag: the encoder, its weights and precision, and the patch geometry it saw."""

    encoder_id: str
    feature_dim: int
    encoder: str = ""
    weights_source: str = ""
    weights_sha256: str = "none"
    precision: str = ""
    dtype: str = "float32"
    input_size: int = 0
    device: str = ""
    target_mpp: float = 0.0
    patch_size: int = 0
    patch_size_target: int = 0
    patch_size_level0: int = 0
    n_failed_patches: int = 0
    model_mpp: float = 0.0  # µm per pixel the model saw (after the encoder's resize)
    native_tile_px: int = 0  # the encoder's native tile (0: not a preset)
    native_mpp: float = 0.0
    wsi_mil_version: str = ""

    @property
    def geometry(self) -> tuple[int, float]:
        """(tile edge, µm/px) of the patches these features were computed from."""
        return int(self.patch_size_target or self.patch_size), round(float(self.target_mpp), 6)

    def to_attrs(self) -> dict:
        return asdict(self)

    @classmethod
    def from_attrs(cls, attrs: dict, encoder_id: str, feature_dim: int) -> FeatureSpec:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in attrs.items() if k in known}
        values.setdefault("encoder_id", encoder_id)
        values.setdefault("feature_dim", feature_dim)
        values["encoder_id"], values["feature_dim"] = str(values["encoder_id"]), int(values["feature_dim"])
        return cls(**values)


def write_features(path: str | Path, slide_id: str, features: np.ndarray, coords: np.ndarray, spec: FeatureSpec,
                   patches: PatchSpec, failed: np.ndarray | None = None) -> None:
    attrs = spec.to_attrs()
    if failed is not None and len(failed):
        attrs["failed_patch_indices"] = np.asarray(failed, np.int64)
    write_h5(path, {"features": features, "coords": coords},
             {"features": attrs, "coords": patches.to_attrs(),
              "/": {"slide_id": slide_id, "stage": "extract", **attrs}},
             chunk_rows=1024)


def read_feature_spec(path: str | Path) -> FeatureSpec:
    path = Path(path)
    with h5py.File(path, "r") as fh:
        ds = fh["features"]
        return FeatureSpec.from_attrs(attrs_of(ds), path.parent.name, int(ds.shape[1]))


def read_feature_coords(path: str | Path) -> tuple[np.ndarray, PatchSpec]:
    """The level-0 coords (N, 2) int64 a features file's rows belong to, with the patch spec it copied
    from the patch file when it was made."""
    with h5py.File(Path(path), "r") as fh:
        return fh["coords"][:].astype(np.int64).reshape(-1, 2), PatchSpec.from_attrs(attrs_of(fh["coords"]))


def feature_fingerprint(path: str | Path) -> str:
    """A short digest of what made a features file: its coords and its :class:`FeatureSpec` (encoder,
    weights' SHA-256, precision, dtype, device, patch geometry). Features made again from other patches
    or with other settings get another digest; a copy of the file keeps it. Outputs made from a bag (the
    heatmaps) record it to notice that their features changed."""
    coords, _ = read_feature_coords(path)
    spec = json.dumps(asdict(read_feature_spec(path)), sort_keys=True, default=str)
    return hashlib.sha256(coords.tobytes() + spec.encode()).hexdigest()[:16]


def read_bag_cells(path: str | Path) -> np.ndarray | None:
    """A bag's (N, 2) int64 grid cells (col, row), row-aligned with its features: the patch grid's
    ``grid_index``, recovered from the level-0 ``coords`` and the grid step (the tiler places patch i at
    round(i * step_level0), so round(coords / step_level0) gives i back exactly). A features file from
    another tool, without our patch spec, takes the smallest spacing between its coords as the step;
    one without ``coords`` has no positions (None)."""
    with h5py.File(Path(path), "r") as fh:
        if "coords" not in fh:
            return None
        coords = fh["coords"][:].astype(np.float64).reshape(-1, 2)
        attrs = attrs_of(fh["coords"])
    step = float(attrs.get("step_level0") or attrs.get("patch_size_level0") or 0) or _spacing(coords)
    return np.rint(coords / step).astype(np.int64)


def _spacing(coords: np.ndarray) -> float:
    gaps = [np.diff(np.unique(coords[:, i])) for i in range(2)]
    gaps = np.concatenate(gaps) if len(coords) else np.zeros(0)
    gaps = gaps[gaps > 0]
    return float(gaps.min()) if len(gaps) else 1.0


def read_bag(path: str | Path, with_coords: bool = False, dtype=None, alloc=None):
    """A bag's (N, D) features (and (N, 2) coords with the patch spec when asked). NaN or inf anywhere is
    an error naming the file: non-finite features never become a prediction.

    ``dtype`` converts on read (HDF5 converts, no second copy); ``alloc(shape, dtype)`` gives the array
    they are read into (the bag cache's own mapped memory, :func:`wsi_mil.runner.memory.mapped_empty`)."""
    path = Path(path)
    with h5py.File(path, "r") as fh:
        ds = fh["features"]
        feats = (alloc or np.empty)(ds.shape, np.dtype(dtype) if dtype is not None else ds.dtype)
        if feats.size:
            ds.read_direct(feats)
        extra = (fh["coords"][:].astype(np.int64).reshape(-1, 2), PatchSpec.from_attrs(attrs_of(fh["coords"]))) \
            if with_coords else None
    if feats.dtype.kind == "f" and not np.isfinite(feats).all():
        bad = int((~np.isfinite(feats)).reshape(len(feats), -1).any(1).sum())
        raise WsiMilError(f"{path.name}: {bad} of {len(feats)} patches have NaN or inf features; "
                          f"extract this slide again (wsi-mil extract --overwrite)")
    return (feats, *extra) if with_coords else feats


def bag_size(path: str | Path) -> int:
    """The number of patches in a features file, without reading them."""
    with h5py.File(path, "r") as fh:
        return int(fh["features"].shape[0])
