"""Stage 2: encoder features for every patch -> ``features/<encoder_id>/<slide_id>.h5``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .. import __version__
from ..config import Config
from ..errors import WsiMilError
from ..features.dataset import patch_dataset
from ..features.encoders import Preset
from ..features.engine import Prepared, extract_patches, prepared_encoder
from ..formats import (
    FeatureSpec,
    PatchSpec,
    read_feature_coords,
    read_feature_spec,
    read_patch_file,
    write_features,
)
from ..h5io import check_features_file
from ..layout import Layout, encoder_id, slide_files
from ..slide import SlideRef
from .base import SlideStage, current

log = logging.getLogger(__name__)


def feature_spec(prep: Prepared, cfg: Config, patches: PatchSpec, n_bad: int) -> FeatureSpec:
    enc = prep.encoder
    edge = patches.patch_size_target or patches.patch_size
    resized_to = enc.transform.resize if enc.transform else enc.input_size
    native = enc.preset
    return FeatureSpec(
        encoder_id=enc.encoder_id, feature_dim=int(enc.dim), encoder=enc.name, weights_source=enc.weights_source,
        weights_sha256=enc.weights_sha256 or "none", precision=prep.precision, dtype=cfg.extract.feature_dtype,
        input_size=int(enc.input_size), device=prep.device.type, target_mpp=patches.target_mpp,
        patch_size=patches.patch_size, patch_size_target=patches.patch_size_target or patches.patch_size,
        patch_size_level0=patches.patch_size_level0, n_failed_patches=int(n_bad),
        model_mpp=float(patches.target_mpp * edge / resized_to), native_tile_px=native.tile_px if native else 0,
        native_mpp=native.mpp if native else 0.0, wsi_mil_version=__version__,
    )


_WARNED: set = set()


def check_geometry(preset: Preset | None, spec: FeatureSpec, slide_id: str) -> None:
    """One warning line per run when the tiles are not the encoder's native ones, giving the scale the model
    actually sees (also recorded in the features file as ``model_mpp``)."""
    if preset is None or spec.geometry == (preset.tile_px, round(preset.mpp, 6)):
        return
    key = (spec.encoder_id, spec.geometry)
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning("%s: encoder '%s' was made for %d-px tiles at %g µm/px; these are %d px at %g µm/px, so it sees "
                    "%.3g µm/px instead of %.3g (unset tiling.patch_size and tiling.target_mpp to tile natively)",
                    slide_id, preset.name, preset.tile_px, preset.mpp, spec.geometry[0], spec.target_mpp,
                    spec.model_mpp, preset.model_mpp)


def check_no_mixing(folder: Path, slide_id: str, spec: FeatureSpec) -> None:
    """Features of other tile geometries never share a folder with these: one line naming a file that differs."""
    for other_id, path in slide_files(folder).items():
        if other_id == slide_id:
            continue
        try:
            theirs = read_feature_spec(path)
        except (OSError, KeyError, ValueError):
            continue
        if theirs.patch_size_target and theirs.geometry != spec.geometry:
            raise WsiMilError(f"{folder.name}/ holds features of {theirs.geometry[0]}-px tiles at {theirs.geometry[1]:g} "
                              f"µm/px ({path.name}); {slide_id}'s patches are {spec.geometry[0]} px at "
                              f"{spec.geometry[1]:g} µm/px: extract into another --out, or redo every slide "
                              f"with --overwrite")
        return  # one file stands for the folder: every file in it passed this check


def extract_slide(slide: SlideRef, cfg: Config, layout: Layout) -> str:
    src = layout.patches(slide.slide_id)
    if not src.is_file():
        raise WsiMilError(f"{slide.slide_id}: no {src.relative_to(layout.root)}; run 'wsi-mil tile' first")
    coords, spec = read_patch_file(src)
    prep = prepared_encoder(cfg.encoder, cfg.extract)
    ds = patch_dataset(slide.path, coords, spec, prep.encoder.geometry, cfg.extract.read_group)
    feats, bad = extract_patches(prep, ds, cfg.extract)
    if len(bad):
        log.warning("%s: %d patch(es) could not be decoded; blank patches stand in", slide.slide_id, len(bad))
    fspec = feature_spec(prep, cfg, spec, len(bad))
    target = layout.features(prep.encoder.encoder_id, slide.slide_id)
    check_geometry(prep.encoder.preset, fspec, slide.slide_id)
    if not cfg.runner.overwrite:
        check_no_mixing(target.parent, slide.slide_id, fspec)
    write_features(target, slide.slide_id, feats.astype(cfg.extract.feature_dtype), coords, fspec, spec, bad)
    note = f"{len(coords)} patches" if len(coords) else "0 patches: empty bag written"
    return note + (f"; {len(bad)} undecodable tile(s) replaced by blank patches" if len(bad) else "")


def stale_reason(path: Path, cfg: Config) -> str:
    """Why complete features at ``path`` are not the ones this config would write now ('' if they are):
    the slide was tiled again since (other coords or tile geometry than ``patches/<slide>.h5``), the
    encoder's weights changed, or ``extract.precision`` / ``extract.feature_dtype`` was set to another
    value. With ``precision: auto`` any precision is kept, so features made on a GPU survive a resume on
    a CPU. Files another tool wrote (no ``wsi_mil_version``) are the user's and always kept."""
    theirs = read_feature_spec(path)
    if not theirs.wsi_mil_version:
        return ""
    patches = Layout(path.parents[2]).patches(path.stem)
    if patches.is_file():
        coords, spec = read_patch_file(patches)
        made_from, their_patches = read_feature_coords(path)
        if not np.array_equal(made_from, coords) or their_patches.patch_size_level0 != spec.patch_size_level0:
            return f"{patches.name} was tiled again after these features were made"
    prep = prepared_encoder(cfg.encoder, cfg.extract)
    if theirs.weights_sha256 != (prep.encoder.weights_sha256 or "none"):
        return "the encoder's weights changed"
    asked = cfg.extract.model_fields_set
    if "precision" in asked and cfg.extract.precision != "auto" and theirs.precision != prep.precision:
        return f"made in {theirs.precision}, extract.precision is {prep.precision}"
    if "feature_dtype" in asked and theirs.dtype != cfg.extract.feature_dtype:
        return f"stored as {theirs.dtype}, extract.feature_dtype is {cfg.extract.feature_dtype}"
    return ""


def _complete(path: Path, cfg: Config) -> bool:
    """A readable features file that is also current (:func:`stale_reason`); else redone, the reason in
    the manifest."""
    check_features_file(path)
    return current(stale_reason(path, cfg))


STAGE = SlideStage(
    name="extract",
    process=extract_slide,
    output=lambda layout, sid, cfg: layout.features(encoder_id(cfg.encoder.name), sid),
    folders=lambda layout, cfg: [layout.features_dir(encoder_id(cfg.encoder.name))],
    complete=_complete,
    gpu=True,
    setup=lambda cfg, layout: prepared_encoder(cfg.encoder, cfg.extract),
)
