"""Stage 2: encoder features for every patch -> ``features/<encoder_id>/<slide_id>.h5``."""

from __future__ import annotations

import logging
from pathlib import Path

from .. import __version__
from ..config import Config
from ..errors import WsiMilError
from ..features.dataset import patch_dataset
from ..features.engine import Prepared, extract_patches, prepared_encoder
from ..formats import FeatureSpec, PatchSpec, read_patch_file, write_features
from ..h5io import check_features_file
from ..layout import Layout, encoder_id
from ..slide import SlideRef
from .base import SlideStage

log = logging.getLogger(__name__)


def feature_spec(prep: Prepared, cfg: Config, patches: PatchSpec, n_bad: int) -> FeatureSpec:
    enc = prep.encoder
    return FeatureSpec(
        encoder_id=enc.encoder_id, feature_dim=int(enc.dim), encoder=enc.name, weights_source=enc.weights_source,
        weights_sha256=enc.weights_sha256 or "none", precision=prep.precision, dtype=cfg.extract.feature_dtype,
        input_size=int(enc.input_size), device=prep.device.type, target_mpp=patches.target_mpp,
        patch_size=patches.patch_size, patch_size_target=patches.patch_size_target or patches.patch_size,
        patch_size_level0=patches.patch_size_level0, n_failed_patches=int(n_bad), wsi_mil_version=__version__,
    )


def extract_slide(slide: SlideRef, cfg: Config, layout: Layout) -> str:
    src = layout.patches(slide.slide_id)
    if not src.is_file():
        raise WsiMilError(f"{slide.slide_id}: no {src.relative_to(layout.root)}; run 'wsi-mil tile' first")
    coords, spec = read_patch_file(src)
    prep = prepared_encoder(cfg.encoder, cfg.extract)
    ds = patch_dataset(slide.path, coords, spec, prep.encoder.input_size, cfg.extract.read_group)
    feats, bad = extract_patches(prep, ds, cfg.extract)
    if len(bad):
        log.warning("%s: %d patch(es) could not be decoded; blank patches stand in", slide.slide_id, len(bad))
    write_features(layout.features(prep.encoder.encoder_id, slide.slide_id), slide.slide_id,
                   feats.astype(cfg.extract.feature_dtype), coords, feature_spec(prep, cfg, spec, len(bad)), spec,
                   bad)
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
