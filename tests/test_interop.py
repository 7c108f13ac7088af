"""Our files as the field's tools read them. Each reader's contract is restated here from its sources
(QuPath's PathClass type adapter, CLAM's patch/feature datasets, TRIDENT's WSIPatcher and folder layout,
torchmil's WSIDataset, OME-NGFF 0.4); none of their code is used."""

import csv
import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch
import zarr
from conftest import CMU, needs_real

from wsi_mil.cli import main
from wsi_mil.config import load_config
from wsi_mil.features.dataset import patch_dataset
from wsi_mil.formats import PatchSpec
from wsi_mil.h5io import read_coords
from wsi_mil.heatmap import export
from wsi_mil.layout import Layout
from wsi_mil.slide import SlideReader, SlideRef
from wsi_mil.stages.tile import tile_slide
from wsi_mil.synthetic import SyntheticSpec, write_slide

ENC = ["encoder.name=resnet18", "encoder.pretrained=false", "extract.num_workers=0", "extract.batch_size=16"]


# -- QuPath ---------------------------------------------------------------------------------------------

def qupath_accepts_classification(value) -> bool:
    """QuPath's PathClass reader (GsonTools.PathClassTypeAdapter, 0.4-0.7): null, a string, an empty object
    or one with colorRGB/parentClass (its own old form), or an object with name|names AND color."""
    if value is None or isinstance(value, str):
        return True
    if not isinstance(value, dict):
        return False
    if not value or "colorRGB" in value or "parentClass" in value:
        return True
    return ("name" in value or "names" in value) and "color" in value


def _features(geo: dict) -> list[dict]:
    assert geo["type"] == "FeatureCollection"
    return geo["features"]


def test_tissue_geojson_classification_is_one_qupath_accepts(slide_factory, tmp_path):
    path = slide_factory("qp1", width=3000, height=2400, mpp=0.5, seed=21)
    layout = Layout(tmp_path)
    tile_slide(SlideRef("qp1", path), load_config(), layout)
    feats = _features(json.loads(layout.mask("qp1", "tissue.geojson").read_text()))
    assert feats
    for f in feats:
        cls = f["properties"]["classification"]
        assert qupath_accepts_classification(cls), cls
        assert cls["name"] == "Tissue" and len(cls["color"]) == 3
    assert not qupath_accepts_classification({"name": "Tissue"})  # the rule really refuses the old form


@pytest.mark.parametrize("form", ["string", "object"])
def test_user_geojson_is_read_in_both_qupath_classification_forms(slide_factory, tmp_path, form):
    path = slide_factory("qp2", width=3000, height=2400, mpp=0.5, seed=22)
    cls = "Tissue" if form == "string" else {"name": "Tissue", "color": [0, 170, 0]}
    square = [[400, 400], [1400, 400], [1400, 1400], [400, 1400], [400, 400]]
    user = tmp_path / "user"
    user.mkdir()
    (user / "qp2.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]},
         "properties": {"objectType": "annotation", "classification": cls}}]}))
    layout = Layout(tmp_path / "out")
    tile_slide(SlideRef("qp2", path), load_config(None, [f"tissue.geojson_dir={user}"]), layout)
    coords, attrs = read_coords(layout.patches("qp2"))
    assert attrs["tissue_source"] == "user_geojson" and len(coords)
    assert coords.min() >= 400 - attrs["patch_size_level0"] and coords.max() <= 1400


def test_a_bad_user_geojson_names_the_file(slide_factory, tmp_path):
    path = slide_factory("qp3", width=2000, height=2000, mpp=0.5, seed=23)
    user = tmp_path / "user"
    user.mkdir()
    (user / "qp3.geojson").write_text("{not json")
    slides = tmp_path / "slides"
    slides.mkdir()
    os.symlink(path, slides / "qp3.svs")
    out = tmp_path / "out"
    assert main(["tile", "--slides", str(slides), "--out", str(out), "--no-progress",
                 f"tissue.geojson_dir={user}"]) == 1
    with (out / "manifest.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert row["status"] == "failed" and "qp3.geojson" in row["reason"] and "not valid JSON" in row["reason"]


def test_patch_geojson_parses_with_awkward_class_names(tmp_path):
    coords = np.array([[0, 0], [256, 0]])
    names = {"attention": np.array([0.1, 0.2]), 'prob_tu"mour': np.array([0.3, 0.3]),
             "prob_nor\\mal": np.array([0.7, 0.7]), "prob_50%d": np.array([0.5, 0.5])}
    export.geojson(tmp_path / "p.geojson", coords, 256, names)
    geo = json.loads((tmp_path / "p.geojson").read_text())
    meas = _features(geo)[1]["properties"]["measurements"]
    assert meas == {"attention": 0.2, 'prob_tu"mour': 0.3, "prob_nor\\mal": 0.7, "prob_50%d": 0.5}
    ring = _features(geo)[0]["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 5


# -- CLAM and TRIDENT patch readers ---------------------------------------------------------------------

def clam_footprint(attrs: dict, level_downsamples) -> float:
    """CLAM (dataset_h5.Whole_Slide_Bag_FP): read_region(coord, patch_level, (patch_size, patch_size)),
    so the level-0 footprint is patch_size * level_downsample[patch_level]."""
    return attrs["patch_size"] * level_downsamples[int(attrs["patch_level"])]


def trident_footprint(attrs: dict) -> int:
    """TRIDENT (WSI.extract_features -> WSIPatcher): without patch_size, level0_magnification and
    target_magnification it falls back to its CLAM path; with them, pixel sizes are 10 / magnification and
    the level-0 footprint is round(patch_size * src_mag / dst_mag)."""
    for key in ("patch_size", "level0_magnification", "target_magnification"):
        assert key in attrs, f"TRIDENT would fall back to its legacy path: no '{key}'"
    return round(attrs["patch_size"] * attrs["level0_magnification"] / attrs["target_magnification"])


@pytest.fixture(scope="module")
def aperio40x(tmp_path_factory):
    """A 40x (0.25 µm/px) Aperio-like slide with levels 1/4/16, tiled at 0.5 µm/px with 256-px patches."""
    root = tmp_path_factory.mktemp("a40")
    path = root / "a40.svs"
    write_slide(path, SyntheticSpec(width=4096, height=3072, mpp=0.25, seed=5, tumour=True, level_factor=4,
                                    min_level_size=200))
    layout = Layout(root / "out")
    tile_slide(SlideRef("a40", path), load_config(), layout)
    return path, layout


def test_clam_reads_our_exact_footprint_on_the_40x_aperio_case(aperio40x):
    path, layout = aperio40x
    coords, attrs = read_coords(layout.patches("a40"))
    with SlideReader(path, "openslide") as r:
        downsamples = r.level_downsamples
        # the common case: 0.5 µm/px from level 0 of a 40x scan is a 512-px read
        assert attrs["patch_level"] == 0 and attrs["patch_size"] == 512
        assert clam_footprint(attrs, downsamples) == pytest.approx(256 * 0.5 / 0.25)
        assert clam_footprint(attrs, downsamples) == attrs["patch_size_level0"]
        # CLAM's pixels are ours: the region it reads is what our dataset reads (before resizing)
        x, y = coords[len(coords) // 2]
        clam = r.read_region((int(x), int(y)), int(attrs["patch_level"]), (int(attrs["patch_size"]),) * 2)
    ds = patch_dataset(path, coords, PatchSpec.from_attrs(attrs), int(attrs["patch_size"]))
    ours = ds[len(coords) // 2]["image"].numpy()
    np.testing.assert_array_equal(clam, ours)


@needs_real
@pytest.mark.parametrize("target_mpp", [0.5, 1.0])
def test_clam_and_trident_read_our_footprint_on_the_real_svs(tmp_path, target_mpp):
    layout = Layout(tmp_path)
    tile_slide(SlideRef("cmu", CMU), load_config(None, [f"tiling.target_mpp={target_mpp}"]), layout)
    _, attrs = read_coords(layout.patches("cmu"))
    with SlideReader(CMU, "openslide") as r:
        downsamples = r.level_downsamples
        exact = 256 * target_mpp / float(r.properties["openslide.mpp-x"])
    assert abs(clam_footprint(attrs, downsamples) - exact) <= 1
    assert abs(trident_footprint(attrs) - exact) <= 1


@pytest.mark.parametrize("overlap", [0.0, 0.5])
def test_trident_reads_our_footprint_and_overlap_in_pixels(aperio40x, tmp_path, overlap):
    path, _ = aperio40x
    layout = Layout(tmp_path)
    cfg = load_config(None, ["tiling.target_mpp=2.0", "tiling.patch_size=128", f"tiling.overlap={overlap}"])
    tile_slide(SlideRef("a40", path), cfg, layout)
    coords, attrs = read_coords(layout.patches("a40"))
    assert attrs["patch_level"] == 1  # 1 µm/px level (downsample 4) is the coarsest <= 2 µm/px
    assert trident_footprint(attrs) == attrs["patch_size_level0"] == round(128 * 2.0 / 0.25)
    with SlideReader(path, "openslide") as r:
        assert r.level_downsamples[:3] == pytest.approx((1, 4, 16))
        assert clam_footprint(attrs, r.level_downsamples) == attrs["patch_size_level0"]
    # TRIDENT's overlap is pixels in the patch_size frame; its step must be our grid's step
    assert isinstance(attrs["overlap"], (int, np.integer))
    step_src = round((attrs["patch_size"] - attrs["overlap"]) * attrs["level0_magnification"]
                     / attrs["target_magnification"])
    xs = np.unique(coords[:, 0])
    assert abs(step_src - np.diff(xs).min()) <= 1


# -- export --format clam | trident | torchmil ----------------------------------------------------------

@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Three slides at a fractional level-0 step (0.499 µm/px scan, 0.5 µm/px target: 256.5 px), tiled and
    extracted, with labels."""
    root = tmp_path_factory.mktemp("study")
    slides = root / "slides"
    slides.mkdir()
    for i in range(3):
        write_slide(slides / f"s{i}.svs", SyntheticSpec(width=2600, height=2100, mpp=0.499, seed=60 + i,
                                                        tumour=i % 2 == 1))
    labels = root / "labels.csv"
    labels.write_text("slide_id,label,patient_id\ns0,normal,P0\ns1,tumour,P1\ns2,normal,P0\n")
    out = root / "out"
    for stage in ("tile", "extract"):
        assert main([stage, "--slides", str(slides), "--out", str(out), "--no-progress", *ENC]) == 0
    return Layout(out), labels


def _export(study_layout, labels, fmt, to):
    assert main(["export", "--format", fmt, "--out", str(study_layout.root), "--to", str(to), *ENC,
                 f"train.labels={labels}"]) == 0


def test_export_clam_layout_reads_like_clams_training_dataset(study, tmp_path):
    layout, labels = study
    to = tmp_path / "clam"
    _export(layout, labels, "clam", to)
    with (to / "dataset.csv").open() as fh:  # Generic_MIL_Dataset: case_id, slide_id, label
        rows = list(csv.DictReader(fh))
    assert [r["slide_id"] for r in rows] == ["s0", "s1", "s2"] and rows[2]["case_id"] == "P0"
    for r in rows:
        sid = r["slide_id"]
        bag = torch.load(to / "pt_files" / f"{sid}.pt", weights_only=True)  # main.py's path: pt_files
        with h5py.File(layout.features("resnet18", sid)) as fh:
            np.testing.assert_array_equal(bag.numpy(), fh["features"][:])
        with h5py.File(to / "h5_files" / f"{sid}.h5") as fh:  # the h5 branch: features + coords
            assert fh["features"].shape[0] == fh["coords"].shape[0] == bag.shape[0]
        with h5py.File(to / "patches" / f"{sid}.h5") as fh:
            assert {"patch_size", "patch_level"} <= set(fh["coords"].attrs)


def test_export_trident_layout_reads_like_tridents_job_folder(study, tmp_path):
    layout, labels = study
    to = tmp_path / "trident"
    _export(layout, labels, "trident", to)
    job = to / "20x_256px_0px_overlap"  # {mag}x_{patch_size}px_{overlap}px_overlap at our target
    for sid in ("s0", "s1", "s2"):
        with h5py.File(job / "patches" / f"{sid}_patches.h5") as fh:
            attrs = dict(fh["coords"].attrs)
            n = len(fh["coords"])
        assert trident_footprint(attrs) == attrs["patch_size_level0"]
        with h5py.File(job / "features_resnet18" / f"{sid}.h5") as fh:
            assert fh["features"].shape == (n, 512)


def torchmil_cells(coords: np.ndarray, patch_size: int) -> np.ndarray:
    """torchmil's WSIDataset._load_coords: (coords / patch_size) - min, then astype(int)."""
    c = coords / patch_size
    return (c - c.min(axis=0)).astype(int)


def test_export_torchmil_keeps_every_grid_cell_distinct(study, tmp_path):
    layout, labels = study
    to = tmp_path / "torchmil"
    _export(layout, labels, "torchmil", to)
    meta = json.loads((to / "torchmil.json").read_text())
    for sid, label in (("s0", "normal"), ("s1", "tumour")):
        feats = np.load(to / "features" / f"{sid}.npy")
        coords = np.load(to / "coords" / f"{sid}.npy")
        assert np.load(to / "labels" / f"{sid}.npy").ndim == 0
        assert int(np.load(to / "labels" / f"{sid}.npy")) == meta["label_map"][label]
        cells = torchmil_cells(coords, meta["patch_size"])
        assert len({tuple(c) for c in cells}) == len(feats) == len(coords)
        # the same reader on our raw level-0 coords merges cells at this fractional step: the defect we avoid
        raw, attrs = read_coords(layout.patches(sid))
        assert len({tuple(c) for c in torchmil_cells(raw, attrs["patch_size_level0"])}) < len(raw)


def _study_bytes(layout: Layout) -> dict[str, bytes]:
    """Every file of the study's output folder, by path, read through no link (what an export must not touch)."""
    return {str(p.relative_to(layout.root)): p.read_bytes() for p in sorted(layout.root.rglob("*"))
            if p.is_file() and not p.is_symlink() and "export" not in p.relative_to(layout.root).parts[0]}


def _export_code(layout, fmt, to, labels=None) -> int:
    return main(["export", "--format", fmt, "--out", str(layout.root), "--to", str(to), *ENC,
                 *([f"train.labels={labels}"] if labels else [])])


def test_export_never_writes_into_or_links_over_the_study_it_reads(study, tmp_path, capsys):
    layout, labels = study
    before = _study_bytes(layout)
    targets = [layout.root, layout.patches_dir, layout.features_dir("resnet18"), layout.root.parent,
               layout.root / "features"]
    link = tmp_path / "link_to_features"
    os.symlink(layout.features_dir("resnet18"), link)
    for fmt in ("clam", "trident", "torchmil"):
        for to in [*targets, link]:
            assert _export_code(layout, fmt, to, labels) == 2, (fmt, to)
            err = capsys.readouterr().err
            assert err.startswith("error: ") and "study's own output folders" in err, err
    # a previous export whose h5_files was made a link into the study: the re-export replaces the folder,
    # and the study's feature files stay regular files with the same bytes
    to = tmp_path / "clam"
    assert _export_code(layout, "clam", to, labels) == 0
    shutil.rmtree(to / "h5_files")
    os.symlink(layout.features_dir("resnet18"), to / "h5_files")
    assert _export_code(layout, "clam", to, labels) == 0
    assert not (to / "h5_files").is_symlink() and (to / "h5_files" / "s0.h5").is_symlink()
    assert _study_bytes(layout) == before
    for p in (*layout.patches_dir.glob("*.h5"), *layout.features_dir("resnet18").glob("*.h5")):
        assert p.is_file() and not p.is_symlink()


def test_a_folder_no_export_made_is_never_replaced(study, tmp_path, capsys):
    layout, labels = study
    mine = tmp_path / "my_documents"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert _export_code(layout, "torchmil", mine, labels) == 2
    assert "no wsi-mil export made" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_a_reexport_replaces_its_whole_folder_and_a_killed_exports_temp_is_removed(study, tmp_path):
    from wsi_mil.atomic import temp_name

    layout, labels = study
    to = tmp_path / "torchmil"
    assert _export_code(layout, "torchmil", to, labels) == 0  # normal=0, tumour=1; s0..s2 labelled
    relabelled = tmp_path / "abc.csv"
    relabelled.write_text("slide_id,label\ns0,C\ns1,A\n")  # s2 no longer labelled
    assert _export_code(layout, "torchmil", to, relabelled) == 0
    meta = json.loads((to / "torchmil.json").read_text())
    assert meta["label_map"] == {"A": 0, "C": 1}
    assert int(np.load(to / "labels" / "s0.npy")) == 1 and int(np.load(to / "labels" / "s1.npy")) == 0
    assert not (to / "labels" / "s2.npy").exists()  # the stale label of the first export is gone
    clam = tmp_path / "clam"
    assert _export_code(layout, "clam", clam, labels) == 0 and (clam / "dataset.csv").is_file()
    dead = temp_name(clam).name.rsplit("-", 1)[0] + "-999999999"
    (clam.parent / dead).mkdir()  # what a SIGKILLed export leaves (a dead writer's pid)
    assert _export_code(layout, "clam", clam) == 0
    assert not (clam / "dataset.csv").exists()  # exported without labels: no old dataset.csv
    assert not (clam.parent / dead).exists()


def test_exported_dataset_csv_neutralises_formulas_and_reads_back(study, tmp_path):
    from wsi_mil.userfiles import read_csv_rows

    layout, _ = study
    labels = tmp_path / "evil.csv"
    labels.write_text('slide_id,label,patient_id\ns0,"=HYPERLINK(""http://x"")",@P0\ns1,normal,-P1\n')
    to = tmp_path / "clam"
    assert _export_code(layout, "clam", to, labels) == 0
    with (to / "dataset.csv").open(newline="") as fh:
        cells = [c for row in csv.reader(fh) for c in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@")]
    rows = read_csv_rows(to / "dataset.csv", "dataset")
    assert rows[0]["label"] == '=HYPERLINK("http://x")' and rows[0]["case_id"] == "@P0" and rows[1]["case_id"] == "-P1"


def test_stray_hidden_and_temp_feature_files_do_not_abort_an_export(study, tmp_path):
    layout, _ = study
    folder = layout.features_dir("resnet18")
    strays = [folder / ".hidden.h5", folder / ".s0.wsi_mil-tmp-otherhost-12.h5"]
    for p in strays:
        p.write_bytes(b"half-written")
    try:
        to = tmp_path / "t"
        assert _export_code(layout, "trident", to) == 0
        assert sorted(p.name for p in to.rglob("*.h5") if "features" in p.parent.name) == ["s0.h5", "s1.h5", "s2.h5"]
    finally:
        for p in strays:
            p.unlink()


# -- OME-Zarr --------------------------------------------------------------------------------------------

def test_ome_zarr_is_ngff_04_with_slash_chunks_and_per_axis_scales(tmp_path):
    raster = np.random.default_rng(1).random((301, 517)).astype(np.float32)
    export.ome_zarr(tmp_path / "s.zarr", raster, 8.0, "s")
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    ms = root.attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["y", "x"]
    assert len(ms["datasets"]) >= 3
    for d in ms["datasets"]:
        zarray = json.loads((tmp_path / "s.zarr" / d["path"] / ".zarray").read_text())
        assert zarray["dimension_separator"] == "/"  # NGFF 0.4 requires "/"
        rows, cols = root[d["path"]].shape
        sy, sx = d["coordinateTransformations"][0]["scale"]
        # every level spans the raster's physical extent along each axis
        assert rows * sy == pytest.approx(301 * 8.0) and cols * sx == pytest.approx(517 * 8.0)
    np.testing.assert_allclose(root["0"][:], raster)


def test_export_follows_the_task_clam_survival_columns_and_torchmil_labels(study, tmp_path):
    """Survival: CLAM's survival forks read survival_months and censorship (1 - event); torchmil gets
    (time, event); regression a float and multi-label a 0/1 vector."""
    layout, _ = study
    labels = tmp_path / "surv.csv"
    labels.write_text("slide_id,os,dead,val,A,B,patient_id\ns0,12.5,1,0.25,1,0,P0\ns1,30,0,1.5,0,1,P1\n"
                      "s2,7.25,1,3,1,1,P0\n")
    surv = [f"train.labels={labels}", "train.task=survival", "train.survival.time_column=os",
            "train.survival.event_column=dead"]
    base = ["export", "--out", str(layout.root), *ENC]
    assert main([*base, "--format", "clam", "--to", str(tmp_path / "clam"), *surv]) == 0
    with (tmp_path / "clam" / "dataset.csv").open() as fh:
        rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
    truth = {r.split(",")[0]: r.split(",") for r in labels.read_text().splitlines()[1:]}
    for sid, r in rows.items():
        assert float(r["survival_months"]) == float(truth[sid][1])
        assert int(r["censorship"]) == 1 - int(truth[sid][2]) and r["case_id"] == truth[sid][6]
    assert main([*base, "--format", "torchmil", "--to", str(tmp_path / "tm"), *surv]) == 0
    for sid in rows:
        np.testing.assert_allclose(np.load(tmp_path / "tm" / "labels" / f"{sid}.npy"),
                                   [float(truth[sid][1]), float(truth[sid][2])])
    reg = [f"train.labels={labels}", "train.task=regression"]
    reg_csv = tmp_path / "reg.csv"
    reg_csv.write_text("slide_id,label\n" + "".join(f"{s},{t[3]}\n" for s, t in truth.items()))
    assert main([*base, "--format", "torchmil", "--to", str(tmp_path / "tm_reg"), *reg[1:],
                 f"train.labels={reg_csv}"]) == 0
    assert float(np.load(tmp_path / "tm_reg" / "labels" / "s2.npy")) == 3.0
    ml = [f"train.labels={labels}", "train.task=multilabel", "train.label_columns=[A,B]"]
    assert main([*base, "--format", "torchmil", "--to", str(tmp_path / "tm_ml"), *ml]) == 0
    assert np.load(tmp_path / "tm_ml" / "labels" / "s1.npy").tolist() == [0, 1]
    assert main([*base, "--format", "clam", "--to", str(tmp_path / "clam_ml"), *ml]) == 0
    with (tmp_path / "clam_ml" / "dataset.csv").open() as fh:
        assert next(csv.DictReader(fh)) == {"case_id": "P0", "slide_id": "s0", "A": "1", "B": "0"}
