"""Issue 20: the same slide in each container a lab or archive stores it in gives the same grid and nearly
the same features: cmu-1-small-region (../shared/slides) as its SVS, a DICOM WSI folder (converted at test
time by wsidicomizer, with its label and overview), a flat stripped TIFF, a PNG with an mpp override, and
an OME-TIFF; a pyramidal OME-TIFF of a synthetic slide; formats no reader here opens fail with one line.
"""

from __future__ import annotations

import shutil
import tracemalloc
import warnings

import h5py
import numpy as np
import pytest
import tifffile
from conftest import CMU, SMALL_ENCODER, needs_real

from wsi_mil.cli import main
from wsi_mil.config import load_config
from wsi_mil.layout import Layout
from wsi_mil.runner.manifest import read_manifest
from wsi_mil.slide import open_slide
from wsi_mil.slide.discover import discover_slides
from wsi_mil.synthetic import SyntheticSpec, write_slide

MPP = 0.499  # the svs's openslide.mpp-x


def _pixels(path) -> np.ndarray:
    with open_slide(path) as reader:
        return [reader.read_region((0, 0), lv, reader.level_dimensions[lv]) for lv in range(reader.level_count)]


def write_ome_tiff(path, levels: list[np.ndarray], mpp: float, jpeg: bool = True) -> None:
    """A pyramidal OME-TIFF as bfconvert lays it out: the base image with its reductions as SubIFDs, 256-px
    tiles (JPEG q95, or lossless deflate), the physical pixel size in the OME-XML."""
    meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp, "PhysicalSizeXUnit": "µm",
            "PhysicalSizeYUnit": "µm"}
    codec = {"compression": "jpeg", "compressionargs": {"level": 95}} if jpeg else {"compression": "zlib"}
    opts = {"tile": (256, 256), "photometric": "rgb", **codec}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, metadata=meta, **opts)
        for level in levels[1:]:
            tif.write(level, subfiletype=1, **opts)


def convert_to_dicom(src, folder) -> None:
    wsidicomizer = pytest.importorskip("wsidicomizer", reason="wsidicomizer not installed: pip install -e '.[dev]'")
    try:
        from opentile.jpeg.jpeg import find_turbojpeg_path

        find_turbojpeg_path()
    except (ImportError, FileNotFoundError):
        pytest.skip("libturbojpeg not installed (wsidicomizer needs it): apt-get install -y libturbojpeg0; "
                    "make test does it when run as root")
    folder.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wsidicomizer.WsiDicomizer.convert(str(src), str(folder), include_label=True, include_overview=True)


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    """cmu-1-small-region in five containers, tiled and extracted by the real stages."""
    if not CMU.is_file():
        pytest.skip("../shared/slides is not present")
    root = tmp_path_factory.mktemp("forms")
    slides = root / "slides"
    slides.mkdir()
    shutil.copy(CMU, slides / "cmu.svs")
    convert_to_dicom(CMU, slides / "cmu_dicom")
    (base,) = _pixels(CMU)
    tifffile.imwrite(slides / "cmu_flat.tif", base, photometric="rgb", rowsperstrip=64, compression="zlib",
                     resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER")
    import cv2

    cv2.imwrite(str(slides / "cmu_png.png"), base[..., ::-1])
    write_ome_tiff(slides / "cmu_ome.ome.tif", [base], MPP, jpeg=False)  # lossless, like the others
    (root / "mpp.csv").write_text(f"slide_id,mpp\ncmu_png,{MPP}\n")
    out = root / "out"
    common = ["--slides", str(slides), "--out", str(out), "--no-progress", "slides.extensions=[.svs,.tif,.png]",
              f"slides.mpp_csv={root / 'mpp.csv'}"]
    assert main(["tile", *common]) == 0
    assert main(["extract", *common, *SMALL_ENCODER]) == 0
    return root


FORMS = {"cmu_dicom": "dicom", "cmu_flat": "tiffslide", "cmu_png": "image", "cmu_ome.ome": "ometiff"}


@needs_real
def test_a_dicom_folder_is_one_slide_and_its_label_and_overview_are_never_tiled(forms):
    import pydicom

    folder = forms / "slides" / "cmu_dicom"
    kinds = sorted(str(pydicom.dcmread(f, stop_before_pixels=True).ImageType[2]) for f in folder.iterdir())
    assert {"LABEL", "OVERVIEW", "VOLUME"} <= set(kinds)  # the converter wrote them all
    refs = discover_slides(forms / "slides", [".svs", ".tif", ".png"])
    assert sorted(r.slide_id for r in refs) == sorted(["cmu", *FORMS])
    assert [r.path for r in refs if r.slide_id == "cmu_dicom"] == [folder]
    assert [r.slide_id for r in discover_slides(folder, [".svs"])] == ["cmu_dicom"]  # the folder given itself
    series = str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID)
    cfg = load_config(None, ["slides.dicom_id_attribute=SeriesInstanceUID"])
    assert [r.slide_id for r in discover_slides(folder, [".svs"], dicom_id=cfg.slides.dicom_id_attribute)] == [series]
    with h5py.File(Layout(forms / "out").patches("cmu_dicom")) as fh:
        attrs = dict(fh["coords"].attrs)
    assert (attrs["level0_width"], attrs["level0_height"]) == (2220, 2967)  # the volume, not a label


@needs_real
@pytest.mark.parametrize("sid", sorted(FORMS))
def test_every_container_gives_the_svs_grid_and_its_features(forms, sid):
    layout = Layout(forms / "out")
    rows = {r["slide_id"]: r for r in read_manifest(layout.manifest) if r.get("stage") == "tile"}
    assert rows[sid]["status"] == "done"
    with h5py.File(layout.patches("cmu")) as a, h5py.File(layout.patches(sid)) as b:
        np.testing.assert_array_equal(b["coords"][:], a["coords"][:])
        assert b["coords"].attrs["slide_mpp"] == pytest.approx(MPP) and b["coords"].attrs["backend"] == FORMS[sid]
    feats = {s: h5py.File(layout.features("resnet18", s))["features"][:] for s in ("cmu", sid)}
    a, b = feats["cmu"].astype(np.float64), feats[sid].astype(np.float64)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert len(a) > 20 and cosine.min() >= 0.99, cosine.min()


def test_a_pyramidal_ome_tiff_reads_its_levels_and_physical_size(tmp_path):
    """A synthetic 3-level slide re-encoded as OME-TIFF: the same levels, mpp from the OME-XML (OpenSlide
    sees one level and no mpp, tiffslide no mpp), pixels within JPEG re-encoding, and the svs's grid."""
    write_slide(tmp_path / "s.svs", SyntheticSpec(width=3000, height=2600, mpp=0.5, tumour=True, seed=3))
    levels = _pixels(tmp_path / "s.svs")
    write_ome_tiff(tmp_path / "s_ome.ome.tif", levels, 0.5)
    with open_slide(tmp_path / "s_ome.ome.tif") as ome, open_slide(tmp_path / "s.svs") as svs:
        assert ome.backend == "ometiff" and ome.mpp == pytest.approx(0.5) and ome.mpp_source == "properties"
        assert ome.level_dimensions == svs.level_dimensions
        diff = np.abs(ome.read_region((900, 700), 1, (300, 200)).astype(int) - svs.read_region((900, 700), 1, (300, 200)))
        assert diff.mean() < 3
    out = tmp_path / "out"
    assert main(["tile", "--slides", str(tmp_path), "--out", str(out), "--no-progress"]) == 0
    with h5py.File(Layout(out).patches("s")) as a, h5py.File(Layout(out).patches("s_ome.ome")) as b:
        np.testing.assert_array_equal(a["coords"][:], b["coords"][:])


def test_a_large_flat_tiff_is_read_in_strips_never_whole(tmp_path):
    """A 12,000 x 12,000 stripped TIFF (432 MB of pixels): a region costs a few strips of memory."""
    path = tmp_path / "big.tif"
    row = np.full((1, 12000, 3), 240, np.uint8)
    row[:, 5000:7000] = (180, 90, 160)
    image = np.broadcast_to(row, (12000, 12000, 3))  # a view: the test itself never holds the 432 MB
    tifffile.imwrite(path, image, photometric="rgb", rowsperstrip=64, compression="zlib", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER", bigtiff=True)
    with open_slide(path) as reader:
        tracemalloc.start()
        region = reader.read_region((5900, 6000), 0, (256, 256))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert reader.mpp == pytest.approx(0.5) and (region == (180, 90, 160)).all()
    assert peak < 40e6, f"{peak / 1e6:.0f} MB for a 256-px region"


def test_formats_no_reader_opens_fail_with_one_line_naming_what_would(tmp_path, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "ok.svs", SyntheticSpec(width=1024, height=1024, mpp=0.5, seed=1))
    (slides / "scan.czi").write_bytes(b"ZISRAWFILE" + bytes(200))
    (slides / "scan2.vsi").write_bytes(bytes(300))
    out = tmp_path / "out"
    assert main(["tile", "--slides", str(slides), "--out", str(out), "--no-progress"]) == 1
    rows = {r["slide_id"]: r for r in read_manifest(Layout(out).manifest)}
    assert rows["ok"]["status"] == "done"
    for sid, name in (("scan", "Zeiss CZI"), ("scan2", "Olympus/Evident VSI")):
        reason = rows[sid]["reason"]
        assert rows[sid]["status"] == "failed" and name in reason and "convert" in reason and "\n" not in reason
    assert "Traceback" not in capsys.readouterr().err


def write_tiled_sparse(src, dst) -> None:
    """A TILED_FULL series rewritten as TILED_SPARSE: each frame's position given in its Plane Position
    (Slide) item, and the frames stored in reverse order, so only the positions say where each goes."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.encaps import encapsulate, generate_fragmented_frames
    from pydicom.sequence import Sequence

    dst.mkdir()
    for f in src.iterdir():
        ds = pydicom.dcmread(f)
        if "VOLUME" in ds.ImageType:
            across = -(-ds.TotalPixelMatrixColumns // ds.Columns)
            frames = [b"".join(fr) for fr in generate_fragmented_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames))]
            order = list(range(len(frames)))[::-1]
            items = []
            for i in order:
                pos = Dataset()
                pos.ColumnPositionInTotalImagePixelMatrix = (i % across) * ds.Columns + 1
                pos.RowPositionInTotalImagePixelMatrix = (i // across) * ds.Rows + 1
                pos.XOffsetInSlideCoordinateSystem = pos.YOffsetInSlideCoordinateSystem = 0
                pos.ZOffsetInSlideCoordinateSystem = 0
                item = Dataset()
                item.PlanePositionSlideSequence = Sequence([pos])
                items.append(item)
            ds.PerFrameFunctionalGroupsSequence = Sequence(items)
            ds.DimensionOrganizationType = "TILED_SPARSE"
            ds.PixelData = encapsulate([frames[i] for i in order])
        ds.save_as(dst / f.name)


@needs_real
def test_a_tiled_sparse_series_reads_as_its_tiled_full_twin(forms, tmp_path):
    full = forms / "slides" / "cmu_dicom"
    write_tiled_sparse(full, tmp_path / "cmu_sparse")
    with open_slide(full) as a, open_slide(tmp_path / "cmu_sparse") as b:
        assert b.backend == "dicom" and b.level_dimensions == a.level_dimensions
        np.testing.assert_array_equal(b.read_region((0, 0), 0, b.dimensions), a.read_region((0, 0), 0, a.dimensions))
