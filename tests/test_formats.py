"""The typed file contracts (wsi_mil.formats): each record's to_attrs / from_attrs are inverse, what the tile
stage writes is exactly one PatchSpec, and files written before a field existed still read."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from wsi_mil.cli import main
from wsi_mil.errors import WsiMilError
from wsi_mil.formats import (
    FeatureSpec,
    PatchSpec,
    Scores,
    TissueMask,
    read_bag,
    read_feature_spec,
    read_patch_file,
    read_scores,
    read_tissue_mask,
    write_features,
    write_patch_file,
    write_scores,
)
from wsi_mil.h5io import attrs_of, write_h5
from wsi_mil.layout import Layout
from wsi_mil.synthetic import SyntheticSpec, write_slide

SPEC = PatchSpec(patch_size=256, patch_level=1, patch_size_level0=512, level0_width=4000, level0_height=3000,
                 patch_size_level=256, downsample=2.0, level_dim=(2000, 1500), name="s", level0_magnification=40.0,
                 target_magnification=20.0, patch_size_target=256, target_mpp=0.5, slide_mpp=0.25,
                 tissue_params={"mpp": 8.0}, slide_path="/x/s.svs")


def test_a_patch_file_round_trips_and_its_attrs_are_what_clam_and_trident_read(tmp_path):
    coords = np.array([[0, 0], [512, 0], [0, 512]], np.int64)
    mask = TissueMask(np.eye(30, 40, dtype=bool), 8.0, 100.0)
    write_patch_file(tmp_path / "s.h5", "s", coords, coords // 512, np.ones(3), SPEC, mask)
    got_coords, got = read_patch_file(tmp_path / "s.h5")
    assert got == SPEC and np.array_equal(got_coords, coords)
    tm = read_tissue_mask(tmp_path / "s.h5")
    assert np.array_equal(tm.mask, mask.mask) and tm.mpp == 8.0 and tm.level0_per_px == 100.0
    with h5py.File(tmp_path / "s.h5") as fh:  # the raw attributes, as the field's readers see them
        raw = attrs_of(fh["coords"])
    assert raw["patch_size"] == 256 and raw["patch_level"] == 1
    assert list(raw["downsample"]) == [2.0, 2.0] and list(raw["level_dim"]) == [2000, 1500]
    assert round(raw["patch_size"] * raw["level0_magnification"] / raw["target_magnification"]) == 512  # TRIDENT


def test_the_tile_stage_writes_exactly_one_patch_spec(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "t.svs", SyntheticSpec(width=1536, height=1280, mpp=0.5, seed=2))
    assert main(["tile", "--slides", str(slides), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    path = Layout(tmp_path / "out").patches("t")
    with h5py.File(path) as fh:
        raw = attrs_of(fh["coords"])
    spec = read_patch_file(path)[1]
    again = spec.to_attrs()
    assert set(again) == set(raw)  # no attribute the record does not know, none it invents
    for key, value in raw.items():
        assert np.array_equal(np.asarray(again[key]), np.asarray(value)), key
    assert spec.slide_mpp == pytest.approx(0.5) and spec.name == "t"


def test_files_written_before_a_field_existed_still_read(tmp_path):
    old = {"patch_size": 224, "patch_level": 0, "patch_size_level0": 224, "level0_width": 900, "level0_height": 700}
    write_h5(tmp_path / "old.h5", {"coords": np.zeros((2, 2), np.int64)}, {"coords": old})
    spec = read_patch_file(tmp_path / "old.h5")[1]
    assert spec.patch_size_level == 224 and spec.min_tissue_fraction == 0.25 and spec.tissue_params == {}
    assert read_tissue_mask(tmp_path / "old.h5") is None
    # a bag another tool wrote: no attributes; its encoder id is its folder's name
    write_h5(tmp_path / "uni" / "x.h5", {"features": np.ones((3, 8), np.float32), "coords": np.zeros((3, 2))})
    assert read_feature_spec(tmp_path / "uni" / "x.h5") == FeatureSpec("uni", 8)


def test_a_features_file_round_trips_and_non_finite_bags_are_refused(tmp_path):
    feats = np.arange(24, dtype=np.float32).reshape(3, 8)
    spec = FeatureSpec("enc", 8, encoder="resnet18", precision="fp32", n_failed_patches=1)
    coords = np.zeros((3, 2), np.int64)
    write_features(tmp_path / "f.h5", "f", feats, coords, spec, SPEC, np.array([2]))
    assert read_feature_spec(tmp_path / "f.h5") == spec
    got, got_coords, got_spec = read_bag(tmp_path / "f.h5", with_coords=True)
    assert np.array_equal(got, feats) and got_spec == SPEC
    with h5py.File(tmp_path / "f.h5") as fh:
        assert list(fh["features"].attrs["failed_patch_indices"]) == [2]
    feats[1, 3] = np.inf
    write_features(tmp_path / "bad.h5", "bad", feats, coords, spec, SPEC)
    with pytest.raises(WsiMilError, match="bad.h5: 1 of 3 patches have NaN or inf"):
        read_bag(tmp_path / "bad.h5")


def test_scores_round_trip_with_per_class_maps_and_refined_patches(tmp_path):
    rng = np.random.default_rng(0)
    s = Scores(coords=np.array([[0, 0], [512, 0]]), spec=SPEC, logits=rng.random(2).astype(np.float32),
               attention=np.array([0.4, 0.6], np.float32), percentile=np.array([25.0, 75.0], np.float32),
               classes=["a", "b"], mapped_class="b", slide_id="s", run="r", model_id="m",
               class_logits=rng.random((2, 2)).astype(np.float32), class_percentile=np.array([[25, 75], [75, 25]],
                                                                                             np.float32),
               refined_coords=np.array([[256, 0]]), refined_percentile=np.array([50.0], np.float32))
    write_scores(tmp_path / "scores.h5", s)
    got = read_scores(tmp_path / "scores.h5")
    for field in ("coords", "logits", "attention", "percentile", "class_logits", "class_percentile",
                  "refined_coords", "refined_percentile"):
        assert np.array_equal(getattr(got, field), getattr(s, field)), field
    assert (got.classes, got.mapped_class, got.spec, got.model_id) == (["a", "b"], "b", SPEC, "m")
    assert list(got.maps()) == ["a", "b"]
    coords, pct = got.points("b")  # the mapped class's map carries the refined patches
    assert len(coords) == 3 and pct[-1] == 50.0 and len(got.points("a")[0]) == 2
