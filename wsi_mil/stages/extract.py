"""Stage 2: encoder features for every patch -> ``features/<encoder_id>/<slide_id>.h5``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .. import __version__
from ..config import Config
from ..errors import WsiMilError
from ..features.dataset import PatchDataset
from ..features.encoders import build_encoder, encoder_id
from ..features.engine import Prepared, extract_patches
from ..h5io import read_coords, write_h5
from ..slide import SlideRef
from .base import SlideStage, per_process
from .tile import patches_path

log = logging.getLogger(__name__)


def prepared(cfg: Config) -> Prepared:
    """The encoder on its device, built once per process and reused for every slide."""
    key = cfg.encoder.model_dump_json() + cfg.extract.model_dump_json(include={"device", "precision", "compile"})
    return per_process("encoder", key, lambda: Prepared.create(build_encoder(cfg.encoder), cfg.extract))


def features_dir(out: Path, cfg: Config) -> Path:
    return Path(out) / "features" / encoder_id(cfg.encoder.name)


def features_path(out: Path, slide_id: str, cfg: Config) -> Path:
    return features_dir(out, cfg) / f"{slide_id}.h5"


def patch_dataset(slide_path, coords: np.ndarray, attrs: dict, input_size: int, group: int = 1) -> PatchDataset:
    """Patches exactly as tiling laid them out: its level, its read size, resized to the encoder input."""
    return PatchDataset(slide_path, attrs.get("backend", "auto"), coords, int(attrs["patch_level"]),
                        int(attrs["patch_size_level"]), int(attrs["patch_size_level0"]), input_size, group)


def feature_attrs(prep: Prepared, cfg: Config, attrs: dict, n_bad: int) -> dict:
    enc = prep.encoder
    return {
        "encoder": enc.name, "encoder_id": enc.encoder_id, "weights_source": enc.weights_source,
        "weights_sha256": enc.weights_sha256 or "none", "feature_dim": enc.dim, "precision": prep.precision,
        "dtype": cfg.extract.feature_dtype, "input_size": enc.input_size, "device": prep.device.type,
        "target_mpp": attrs["target_mpp"], "patch_size": attrs["patch_size"],
        "patch_size_level0": attrs["patch_size_level0"], "n_failed_patches": int(n_bad),
        "wsi_mil_version": __version__,
    }


def extract_slide(slide: SlideRef, cfg: Config, out: Path) -> str:
    src = patches_path(out, slide.slide_id)
    if not src.is_file():
        raise WsiMilError(f"{slide.slide_id}: no {src.relative_to(out)}; run 'wsi-mil tile' first")
    coords, attrs = read_coords(src)
    prep = prepared(cfg)
    ds = patch_dataset(slide.path, coords, attrs, prep.encoder.input_size, cfg.extract.read_group)
    feats, bad = extract_patches(prep, ds, cfg.extract)
    fattrs = feature_attrs(prep, cfg, attrs, len(bad))
    if len(bad):
        log.warning("%s: %d patch(es) could not be decoded; blank patches stand in", slide.slide_id, len(bad))
        fattrs["failed_patch_indices"] = bad.astype(np.int64)
    write_h5(
        features_path(out, slide.slide_id, cfg),
        {"features": feats.astype(cfg.extract.feature_dtype), "coords": coords},
        {"features": fattrs, "coords": attrs, "/": {"slide_id": slide.slide_id, "stage": "extract", **fattrs}},
        chunk_rows=1024,
    )
    note = f"{len(coords)} patches" if len(coords) else "0 patches: empty bag written"
    return note + (f"; {len(bad)} undecodable tile(s) replaced by blank patches" if len(bad) else "")


STAGE = SlideStage(
    name="extract",
    process=extract_slide,
    output=features_path,
    folders=lambda out, cfg: [features_dir(out, cfg)],
    gpu=True,
    setup=lambda cfg, out: prepared(cfg),
)
