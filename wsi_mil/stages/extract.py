"""Stage 2: encoder features for every patch -> ``features/<encoder_id>/<slide_id>.h5``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .. import __version__
from ..config import Config
from ..errors import WsiMilError
from ..features.dataset import patch_dataset
from ..features.engine import Prepared, extract_patches, prepared_encoder
from ..h5io import check_features_file, read_coords, write_h5
from ..layout import Layout, encoder_id
from ..slide import SlideRef
from .base import SlideStage

log = logging.getLogger(__name__)


def feature_attrs(prep: Prepared, cfg: Config, attrs: dict, n_bad: int) -> dict:
    enc = prep.encoder
    return {
        "encoder": enc.name, "encoder_id": enc.encoder_id, "weights_source": enc.weights_source,
        "weights_sha256": enc.weights_sha256 or "none", "feature_dim": enc.dim, "precision": prep.precision,
        "dtype": cfg.extract.feature_dtype, "input_size": enc.input_size, "device": prep.device.type,
        "target_mpp": attrs["target_mpp"], "patch_size": attrs["patch_size"],
        "patch_size_target": attrs.get("patch_size_target", attrs["patch_size"]),
        "patch_size_level0": attrs["patch_size_level0"], "n_failed_patches": int(n_bad),
        "wsi_mil_version": __version__,
    }


def extract_slide(slide: SlideRef, cfg: Config, layout: Layout) -> str:
    src = layout.patches(slide.slide_id)
    if not src.is_file():
        raise WsiMilError(f"{slide.slide_id}: no {src.relative_to(layout.root)}; run 'wsi-mil tile' first")
    coords, attrs = read_coords(src)
    prep = prepared_encoder(cfg.encoder, cfg.extract)
    ds = patch_dataset(slide.path, coords, attrs, prep.encoder.input_size, cfg.extract.read_group)
    feats, bad = extract_patches(prep, ds, cfg.extract)
    fattrs = feature_attrs(prep, cfg, attrs, len(bad))
    if len(bad):
        log.warning("%s: %d patch(es) could not be decoded; blank patches stand in", slide.slide_id, len(bad))
        fattrs["failed_patch_indices"] = bad.astype(np.int64)
    write_h5(
        layout.features(prep.encoder.encoder_id, slide.slide_id),
        {"features": feats.astype(cfg.extract.feature_dtype), "coords": coords},
        {"features": fattrs, "coords": attrs, "/": {"slide_id": slide.slide_id, "stage": "extract", **fattrs}},
        chunk_rows=1024,
    )
    note = f"{len(coords)} patches" if len(coords) else "0 patches: empty bag written"
    return note + (f"; {len(bad)} undecodable tile(s) replaced by blank patches" if len(bad) else "")


def _complete(path: Path, cfg: Config) -> bool:
    check_features_file(path)
    return True


STAGE = SlideStage(
    name="extract",
    process=extract_slide,
    output=lambda layout, sid, cfg: layout.features(encoder_id(cfg.encoder.name), sid),
    folders=lambda layout, cfg: [layout.features_dir(encoder_id(cfg.encoder.name))],
    complete=_complete,
    gpu=True,
    setup=lambda cfg, layout: prepared_encoder(cfg.encoder, cfg.extract),
)
