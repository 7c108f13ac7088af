import json
import os
import shutil

import h5py
import numpy as np
import pytest
import zarr
from scipy.stats import percentileofscore

from wsi_mil.cli import main
from wsi_mil.heatmap import export
from wsi_mil.heatmap.raster import colorize, score_raster
from wsi_mil.heatmap.scores import percentile_rank
from wsi_mil.layout import Layout
from wsi_mil.slide import SlideReader


def test_percentiles_are_right_with_ties():
    scores = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 0.5, 2.0])
    got = percentile_rank(scores)
    expected = [percentileofscore(scores, s, kind="mean") for s in scores]
    np.testing.assert_allclose(got, expected)
    assert got[0] == got[2] == got[4]  # tied scores share a percentile
    ref = np.array([1.0, 2.0, 3.0, 4.0])  # against another reference (refinement)
    np.testing.assert_allclose(percentile_rank(np.array([2.0, 5.0, 0.0]), ref), [37.5, 100.0, 0.0])


@pytest.mark.parametrize("slide_mpp", [0.25, 0.5])
@pytest.mark.parametrize("raster_mpp", [8.0, 16.0])
def test_a_patch_lands_on_the_right_raster_pixels(slide_mpp, raster_mpp):
    size0 = 128 / slide_mpp  # a 128 µm patch
    ds = raster_mpp / slide_mpp
    x, y = int(1000 / slide_mpp), int(640 / slide_mpp)  # level-0 px of a point at (1000 µm, 640 µm)
    w0, h0 = int(4000 / slide_mpp), int(3000 / slide_mpp)
    r = score_raster(np.array([[x, y]]), np.array([0.7]), size0, w0, h0, ds)
    assert r.shape == (int(np.ceil(3000 / raster_mpp)), int(np.ceil(4000 / raster_mpp)))
    ys, xs = np.nonzero(np.isfinite(r))
    # physical placement: pixel j covers [j*raster_mpp, (j+1)*raster_mpp) µm
    assert xs.min() == round(1000 / raster_mpp) and xs.max() + 1 == round(1128 / raster_mpp)
    assert ys.min() == round(640 / raster_mpp) and ys.max() + 1 == round(768 / raster_mpp)
    assert np.allclose(r[np.isfinite(r)], 0.7)


def test_overlapping_patches_average():
    coords = np.array([[0, 0], [64, 0]])
    r = score_raster(coords, np.array([1.0, 0.0]), 128, 256, 128, 16)
    assert r[0, 0] == 1.0 and r[0, 5] == 0.5 and r[0, 9] == 0.0 and np.isnan(r[0, 15])


def test_tiff_export_opens_in_both_readers_with_its_mpp(tmp_path):
    rng = np.random.default_rng(0)
    raster = rng.random((700, 900)).astype(np.float32)
    raster[:50] = np.nan
    path = tmp_path / "h.tiff"
    export.heatmap_tiff(path, colorize(raster, "jet"), mpp=8.0, slide_id="s")
    for backend in ("openslide", "tiffslide"):
        with SlideReader(path, backend) as r:
            assert r.dimensions == (900, 700)
            assert r.level_count >= 2
            mpp = float(r.properties.get(f"{backend}.mpp-x"))
            assert mpp == pytest.approx(8.0, rel=1e-3)
            top = r.read_region((0, 0), 0, (900, 40))
            assert top.min() > 240  # NaN rows are white


def test_geojson_is_valid_for_qupath(tmp_path):
    coords = np.array([[0, 0], [256, 512], [1000, 744]])
    path = tmp_path / "p.geojson"
    export.geojson(path, coords, 256, {"attention": np.array([0.1, -2.0, 3.0]),
                                       "attention_percentile": np.array([50.0, 16.7, 83.3]),
                                       "prob_tumour": np.full(3, 0.9)})
    gj = json.loads(path.read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 3
    w0, h0 = 1256, 1000
    for f, (x, y) in zip(gj["features"], coords):
        assert f["properties"]["objectType"] == "detection"
        assert set(f["properties"]["measurements"]) == {"attention", "attention_percentile", "prob_tumour"}
        ring = f["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) == 5
        assert all(0 <= px <= w0 and 0 <= py <= h0 for px, py in ring)
        assert ring[0] == [x, y] and ring[2] == [x + 256, y + 256]
    assert gj["features"][1]["properties"]["measurements"]["attention"] == -2.0


def test_ome_zarr_reads_back_with_multiscale_metadata(tmp_path):
    raster = np.random.default_rng(1).random((300, 520)).astype(np.float32)
    raster[0, 0] = np.nan
    path = tmp_path / "s.zarr"
    export.ome_zarr(path, raster, mpp=8.0, name="s1")
    root = zarr.open_group(str(path), mode="r")
    ms = root.attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["y", "x"]
    assert all(a["unit"] == "micrometer" for a in ms["axes"])
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales[0] == [8.0, 8.0] and len(scales) >= 2 and scales[1] == pytest.approx([16.0, 16.0], rel=0.01)
    level0 = root[ms["datasets"][0]["path"]][:]
    np.testing.assert_array_equal(level0, raster)
    assert root[ms["datasets"][1]["path"]].shape == (150, 260)


def test_heatmap_stage_end_to_end_with_refinement(cohort, tmp_path):
    out = tmp_path / "out"
    slides = ["--slides", str(cohort / "slides")]
    enc = ["encoder.name=resnet18", "encoder.pretrained=false", "extract.num_workers=0"]
    common = ["--out", str(out), "--no-progress"]
    assert main(["tile", *slides, *common]) == 0
    assert main(["extract", *slides, *common, *enc]) == 0
    assert main(["train", *common, *enc, f"train.labels={cohort / 'labels.csv'}", "train.folds=2",
                 "train.epochs=3", "model.hidden_dim=32", "model.attention_dim=16"]) == 0
    assert main(["heatmap", *slides, *common, *enc, "heatmap.top_k=2"]) == 0
    folder = out / "heatmaps" / "default" / "syn_001"
    for name in ("overlay.png", "heatmap.tiff", "patches.geojson", "scores.h5", "summary.json"):
        assert (folder / name).stat().st_size > 0, name
    assert (folder / "scores.zarr" / ".zattrs").is_file()
    assert len(list((folder / "top_k").glob("top_*.png"))) == 2
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["prediction"] in ("normal", "tumour") and summary["n_models"] == 2
    assert abs(sum(summary["probabilities"].values()) - 1) < 1e-5
    assert summary["encoder_id"] == "resnet18" and summary["n_refined_patches"] == 0
    # refinement: a denser grid, only new patches extracted, in a second run folder
    assert main(["heatmap", *slides, *common, *enc, "heatmap.refine=true", "heatmap.exports=[png]",
                 "heatmap.top_k=0", "--overwrite"]) == 0
    refined = json.loads((folder / "summary.json").read_text())
    assert refined["n_refined_patches"] > refined["n_patches"]  # overlap 0.5 roughly quadruples the grid
    assert refined["probabilities"] == summary["probabilities"]  # the bag prediction uses the base grid
    # the viewer paints the refined patches too: its map is the one the exports drew (issue 17)
    from wsi_mil.viewer.tiles import SlideView

    view = SlideView(cohort / "slides" / "syn_001.svs", out / "patches" / "syn_001.h5", folder / "scores.h5")
    try:
        coords, pct = view.scores.points("attention")
        assert len(coords) == len(pct) == refined["n_patches"] + refined["n_refined_patches"]
        with h5py.File(folder / "scores.h5") as fh:
            np.testing.assert_array_equal(coords[refined["n_patches"]:], fh["refined_coords"][:])
    finally:
        view.close()


def test_run_takes_new_slides_through_tile_extract_predict_heatmap(cohort, tmp_path):
    import csv
    import shutil

    out = tmp_path / "trained"
    enc = ["encoder.name=resnet18", "encoder.pretrained=false", "extract.num_workers=0"]
    assert main(["tile", "--slides", str(cohort / "slides"), "--out", str(out), "--no-progress"]) == 0
    assert main(["extract", "--slides", str(cohort / "slides"), "--out", str(out), "--no-progress", *enc]) == 0
    assert main(["train", "--out", str(out), "--no-progress", *enc, f"train.labels={cohort / 'labels.csv'}",
                 "train.folds=2", "train.epochs=2", "model.hidden_dim=16", "model.attention_dim=8"]) == 0
    new = tmp_path / "new"
    new.mkdir()
    shutil.copy(cohort / "slides" / "syn_003.svs", new / "case_a.svs")
    deploy = tmp_path / "deploy"
    assert main(["run", "--slides", str(new), "--out", str(deploy), "--model", str(out / "models" / "default"),
                 "--no-progress", *enc]) == 0
    with (deploy / "predictions" / "default.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["slide_id"] for r in rows] == ["case_a"] and rows[0]["pred"] in ("normal", "tumour")
    assert (deploy / "heatmaps" / "default" / "case_a" / "summary.json").is_file()
    assert (deploy / "patches" / "case_a.h5").is_file() and (deploy / "features" / "resnet18" / "case_a.h5").is_file()


def test_every_registered_export_writes_its_files_under_the_slide_folder(tmp_path, slide_factory):
    """The export contract: called with an ExportJob, each registered export writes only under job.folder."""
    path = slide_factory("exp1", width=2048, height=1536, mpp=0.5, seed=12, tumour=True)
    coords = np.array([[0, 0], [256, 0], [512, 256]])
    raster = np.full((48, 64), np.nan, np.float32)
    raster[:16, :32] = 0.8
    with SlideReader(path) as reader:
        reader.mpp = 0.5
        for name, fn in sorted(export.EXPORTS.items()):
            folder = tmp_path / name
            job = export.ExportJob(folder=folder, slide_id="exp1", reader=reader, raster=raster,
                                   colour=colorize(raster), raster_mpp=16.0, coords=coords, size0=256,
                                   patch_level=0, patch_size_level=256,
                                   measurements={"attention": np.arange(3.0)}, percentile=np.array([10.0, 50, 90]),
                                   title="exp1", cmap="jet", alpha=0.5, top_k=1)
            before = {p for p in tmp_path.rglob("*") if p.is_file()}
            extra = fn(job)
            assert extra is None or isinstance(extra, dict), name
            new = {p for p in tmp_path.rglob("*") if p.is_file()} - before
            assert new and all(folder in p.parents for p in new), name
    assert {"png", "tiff", "geojson", "zarr", "patches"} <= set(export.EXPORTS)


def test_unknown_export_names_are_refused_in_one_line(cohort, tmp_path, capsys):
    assert main(["heatmap", "--slides", str(cohort / "slides"), "--out", str(tmp_path), "heatmap.exports=[png,pdf]"]) == 2
    assert "unknown export 'pdf'" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["clam_mb", "transmil", "dsmil", "dtfd_mil"])
def test_every_kind_of_head_maps_and_per_class_heads_export_one_measurement_per_class(mapped, tmp_path, model):
    import csv

    import h5py
    from conftest import SMALL_ENCODER

    from wsi_mil.layout import Layout

    slides, out = mapped
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        csv.writer(fh).writerows([["slide_id", "label"], ["m0", "a"], ["m1", "b"], ["glass", "c"]])
    common = ["--out", str(out), "--no-progress", *SMALL_ENCODER, f"train.run_name=pc_{model}"]
    assert main(["train", *common, f"train.labels={labels}", f"model.name={model}", "train.folds=1",
                 "train.val_fraction=0", "train.epochs=2", "model.hidden_dim=16", "model.attention_dim=8"]) == 0
    assert main(["heatmap", "--slides", str(slides), *common, "heatmap.top_k=1"]) == 0
    layout = Layout(out)
    summary = json.loads(layout.heatmap_summary(f"pc_{model}", "m1").read_text())
    assert set(summary["probabilities"]) == {"a", "b", "c"} and summary["mapped_class"] == summary["prediction"]
    folder = layout.heatmap_dir(f"pc_{model}", "m1")
    geo = json.loads((folder / "patches.geojson").read_text())
    names = set(geo["features"][0]["properties"]["measurements"])
    with h5py.File(folder / "scores.h5") as fh:
        n = len(fh["coords"])
        from wsi_mil.mil.models import create_model

        if create_model(model, 4, 3).per_class:  # one map per class
            assert summary["per_class_maps"] and fh["class_attention_logits"].shape == (3, n)
            assert {f"attention_percentile_{c}" for c in "abc"} <= names
            k = "abc".index(summary["prediction"])
            np.testing.assert_allclose(fh["attention_logits"][:], fh["class_attention_logits"][k], rtol=1e-6)
        else:
            assert not summary["per_class_maps"] and "class_attention_logits" not in fh
    assert {"attention", "attention_percentile", "prob_a", "prob_b", "prob_c"} <= names
    assert (folder / "overlay.png").stat().st_size > 0 and (folder / "scores.zarr" / ".zattrs").is_file()


def test_heatmap_folders_keep_run_names_with_dots():
    from wsi_mil.config import load_config
    from wsi_mil.stages.heatmap import run_name

    assert run_name(load_config(None, ["train.run_name=lr0.0005"])) == "lr0.0005"
    assert run_name(load_config(None, ["heatmap.run=/runs/x/fold_0.safetensors"])) == "fold_0"


def test_unicode_slide_ids_get_every_heatmap_output_and_a_failed_slide_leaves_no_partial_folder(
        mapped, tmp_path, monkeypatch):
    """A slide named ``é中文`` failed with "TIFF strings must be 7-bit ASCII" and left its partial outputs."""
    from urllib.parse import unquote

    import tifffile

    from wsi_mil.heatmap import export as exports

    slides0, out0 = mapped
    slides, out = tmp_path / "slides", tmp_path / "out"
    slides.mkdir()
    shutil.copytree(out0, out)
    uni = "é中文"
    os.symlink(slides0 / "m1.svs", slides / f"{uni}.svs")
    os.symlink(slides0 / "m0.svs", slides / "m0.svs")
    layout = Layout(out)
    for sub in (layout.patches("m1"), layout.features("resnet18", "m1")):
        shutil.copyfile(sub, sub.with_name(f"{uni}.h5"))
    labels = tmp_path / "labels.csv"
    labels.write_text(f"slide_id,label\nm0,normal\n{uni},tumour\n", encoding="utf-8")
    common = ["--out", str(out), "--no-progress", "encoder.name=resnet18", "encoder.pretrained=false"]
    assert main(["train", *common, f"train.labels={labels}", "train.folds=1", "train.val_fraction=0",
                 "train.epochs=1", "model.hidden_dim=16", "model.attention_dim=8"]) == 0
    assert main(["heatmap", "--slides", str(slides), *common, "heatmap.top_k=1"]) == 0
    folder = layout.heatmap_dir("default", uni)
    with tifffile.TiffFile(folder / "heatmap.tiff") as tif:
        assert uni in unquote(tif.pages[0].description)
    assert json.loads((folder / "summary.json").read_text(encoding="utf-8"))["slide_id"] == uni

    def broken(job):
        raise OSError("disk went away")

    monkeypatch.setitem(exports.EXPORTS, "tiff", broken)
    assert main(["heatmap", "--slides", str(slides), *common, "--overwrite", "heatmap.top_k=1"]) == 1
    # the failed rewrite left the previous, complete folder; a slide never mapped leaves nothing
    assert (folder / "summary.json").is_file() and (folder / "heatmap.tiff").is_file()
    shutil.rmtree(layout.heatmaps_dir("default"))
    assert main(["heatmap", "--slides", str(slides), *common, "heatmap.top_k=1"]) == 1
    assert [p.name for p in layout.heatmaps_dir("default").iterdir()] == []
