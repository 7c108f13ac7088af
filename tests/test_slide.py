import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import BROKEN, CMU, needs_real

from wsi_mil.config import SlidesConfig
from wsi_mil.errors import SlideError, WsiMilError
from wsi_mil.slide import SlideReader, discover_slides, open_slide
from wsi_mil.slide.mpp import load_mpp_csv


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_synthetic_slide_opens_in_both_backends_with_its_mpp(slide_factory, backend):
    path = slide_factory("plain", width=3000, height=2200, mpp=0.25, seed=1)
    with open_slide(path, SlidesConfig(backend=backend)) as r:
        assert r.backend == backend
        assert r.mpp == pytest.approx(0.25, rel=1e-4)
        assert r.level_count >= 3
        assert r.level_downsamples[:3] == (1.0, 2.0, 4.0)
        assert r.level_dimensions[1] == (1500, 1100)
        assert r.best_level_for_mpp(0.5) == 1
        assert r.best_level_for_mpp(0.9) == 1  # largest mpp <= target, never coarser
        assert r.best_level_for_mpp(0.1) == 0


def test_backends_return_the_same_pixels_and_white_outside(slide_factory):
    path = slide_factory("plain", width=3000, height=2200, mpp=0.25, seed=1)
    with SlideReader(path, "openslide") as a, SlideReader(path, "tiffslide") as b:
        for level in (0, 1):
            ra = a.read_region((1200, 900), level, (300, 200))
            rb = b.read_region((1200, 900), level, (300, 200))
            assert ra.shape == (200, 300, 3) and ra.dtype == np.uint8
            assert np.abs(ra.astype(int) - rb.astype(int)).max() <= 2
        edge_a = a.read_region((2900, 2100), 0, (200, 200))
        edge_b = b.read_region((2900, 2100), 0, (200, 200))
        assert (edge_a[100:, 100:] == 255).all() and (edge_b[100:, 100:] == 255).all()
        np.testing.assert_array_equal(edge_a, edge_b)


@needs_real
@pytest.mark.parametrize("backend", ["openslide", "tiffslide", "auto"])
def test_real_svs_mpp(backend):
    with open_slide(CMU, SlidesConfig(backend=backend)) as r:
        assert r.mpp == pytest.approx(0.499)
        assert r.dimensions == (2220, 2967)
        assert r.backend in ("openslide", "tiffslide")


@needs_real
def test_broken_slide_gives_one_line_naming_the_file():
    with pytest.raises(SlideError) as err:
        SlideReader(BROKEN)
    assert "broken.svs" in str(err.value) and "\n" not in str(err.value)


@needs_real
def test_a_truncated_svs_names_the_file_and_says_what_is_wrong(tmp_path):
    data = CMU.read_bytes()
    path = tmp_path / "truncated.svs"
    path.write_bytes(data[: len(data) // 3])  # the first IFD lies beyond the cut
    with pytest.raises(SlideError) as err:
        SlideReader(path)
    text = str(err.value)
    assert text.startswith("truncated.svs: cannot open slide") and "truncated" in text.split(":", 1)[1]
    assert "\n" not in text


def test_mpp_resolution_order(slide_factory, tmp_path):
    props = slide_factory("props", width=1024, height=1024, mpp=0.5, seed=2)
    tags = slide_factory("tags", width=1024, height=1024, mpp=0.5, seed=2, mpp_in_metadata=False)
    power = slide_factory("power", width=1024, height=1024, mpp=0.5, seed=2, mpp_in_metadata=False,
                          resolution_tags=False)
    bare = slide_factory("bare", width=1024, height=1024, mpp=0.5, seed=2, mpp_in_metadata=False,
                         resolution_tags=False, objective_in_metadata=False)
    assert open_slide(props).mpp_source == "properties"
    r = open_slide(tags)
    assert r.mpp_source == "tiff_resolution" and r.mpp == pytest.approx(0.5, rel=1e-6)
    r = open_slide(power)
    assert r.mpp_source == "objective_power" and r.mpp == pytest.approx(0.5)
    with pytest.raises(SlideError) as err:
        open_slide(bare)
    msg = str(err.value)
    assert "bare" in msg and "slides.mpp_csv" in msg and "slides.default_mpp" in msg
    r = open_slide(bare, SlidesConfig(default_mpp=0.3))
    assert (r.mpp, r.mpp_source) == (0.3, "default_mpp")
    csv_path = tmp_path / "mpp.csv"
    csv_path.write_text("slide_id,mpp\nbare,0.42\nprops,0.26\n")
    overrides = load_mpp_csv(csv_path)
    assert open_slide(bare, mpp_overrides=overrides).mpp == 0.42
    assert open_slide(props, mpp_overrides=overrides).mpp == 0.26  # the CSV wins over metadata


def test_discovery_folder_csv_and_duplicates(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "s1.svs").write_bytes(b"x")
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "a" / "sub").mkdir()
    (tmp_path / "a" / "sub" / "s2.tif").write_bytes(b"x")
    exts = SlidesConfig().extensions
    assert [s.slide_id for s in discover_slides(tmp_path / "a", exts)] == ["s1"]
    assert [s.slide_id for s in discover_slides(tmp_path / "a", exts, recursive=True)] == ["s1", "s2"]
    listing = tmp_path / "list.csv"
    with listing.open("w", newline="") as fh:
        csv.writer(fh).writerows([["path"], ["a/s1.svs"], ["a/sub/s2.tif"]])
    assert [s.path.name for s in discover_slides(listing, exts)] == ["s1.svs", "s2.tif"]
    (tmp_path / "a" / "sub" / "s1.tiff").write_bytes(b"x")
    with pytest.raises(WsiMilError, match="duplicate slide_id 's1'"):
        discover_slides(tmp_path / "a", exts, recursive=True)


def _masks_agree(reader, mpp: float = 8.0) -> tuple[float, int]:
    """(share of mask pixels that differ, differing pixels farther than 2 px from the plain mask's edge)."""
    import cv2

    from wsi_mil.tissue import detect_tissue

    masks = []
    for fast in (False, True):
        reader.fast_thumbnail = fast
        img, scale = reader.read_at_mpp(mpp)
        masks.append(detect_tissue(img, scale * reader.mpp))
    plain, fast = masks
    k = np.ones((5, 5), np.uint8)
    band = cv2.dilate(plain.astype(np.uint8), k) ^ cv2.erode(plain.astype(np.uint8), k)
    diff = plain ^ fast
    return diff.sum() / max(1, plain.sum()), int((diff & ~band.astype(bool)).sum())


@pytest.mark.parametrize("factor, min_size", [(4, 300), (4, 2000), (2, 512)])
def test_the_prescaled_thumbnail_gives_the_plain_paths_mask_on_every_pyramid(slide_factory, monkeypatch, factor,
                                                                               min_size):
    from wsi_mil.slide import thumbnail

    path = slide_factory(f"pyr{factor}_{min_size}", width=8192, height=6144, mpp=0.25, seed=31, tumour=True, pen=True,
                         level_factor=factor, min_level_size=min_size)
    calls = []
    real = thumbnail.decode_level_scaled
    monkeypatch.setattr(thumbnail, "decode_level_scaled", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    with open_slide(path) as r:
        share, far = _masks_agree(r)
    assert calls and calls[0] >= 2  # the level was decoded pre-scaled
    assert share <= 0.02 and far <= 0.001 * (8192 * 6144 / 32**2)


@needs_real
def test_the_prescaled_thumbnail_gives_the_plain_paths_mask_on_the_real_svs():
    with open_slide(CMU) as r:
        share, far = _masks_agree(r)
    assert share <= 0.03 and far <= 40


def _container(name: str, svs: Path, folder: Path) -> Path:
    """The synthetic slide as the backend ``name`` reads it: the SVS itself, an OME-TIFF of its levels, a PNG
    of its base level, or a DICOM WSI folder (wsidicomizer)."""
    from test_slide_formats import _pixels, convert_to_dicom, write_ome_tiff

    if name in ("openslide", "tiffslide"):
        return svs
    if name == "ometiff":
        write_ome_tiff(folder / "r.ome.tif", _pixels(svs), 0.5)
        return folder / "r.ome.tif"
    if name == "image":
        cv2.imwrite(str(folder / "r.png"), _pixels(svs)[0][..., ::-1])
        return folder / "r.png"
    if name == "dicom":
        convert_to_dicom(svs, folder / "r_dicom")
        return folder / "r_dicom"
    raise AssertionError(f"no test container for the new backend '{name}': add one here")


def test_every_registered_backend_reads_the_same_pixels_and_an_unknown_one_is_one_line(tmp_path, capsys):
    """The reader registry's contract, over every registered backend, each on the same synthetic slide in
    its container: the same size, regions within JPEG re-encoding of each other (white outside the
    slide), and a source Deep Zoom can tile."""
    from wsi_mil.cli import main
    from wsi_mil.slide.backends import BACKENDS, backend_order
    from wsi_mil.slide.deepzoom import deepzoom
    from wsi_mil.synthetic import SyntheticSpec, write_slide

    path = tmp_path / "r.svs"
    write_slide(path, SyntheticSpec(width=1100, height=900, mpp=0.5, seed=4))
    assert [e.name for e in backend_order("auto")] == ["dicom", "ometiff", "openslide", "tiffslide", "image"]
    regions = {}
    for name in BACKENDS:
        with SlideReader(_container(name, path, tmp_path), name) as r:
            assert r.backend == name and r.dimensions == (1100, 900)
            regions[name] = r.read_region((1000, 800), 0, (200, 150))
            assert (regions[name][100:, 100:] == 255).all()  # outside the slide: white
            dz = deepzoom(r)
            assert dz.level_dimensions[-1] == (1100, 900) and dz.get_tile(dz.level_count - 1, (0, 0)).size == (256, 256)
    for name, region in regions.items():
        assert np.abs(region.astype(int) - regions["openslide"]).mean() < 3, name
    slides = tmp_path / "slides"
    slides.mkdir()
    path.rename(slides / path.name)
    code = main(["tile", "--slides", str(slides), "--out", str(tmp_path / "out"), "slides.backend=pillow"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: config error: slides.backend: unknown slide backend 'pillow' (choose from "
                                 "auto, dicom, image, ometiff, openslide, tiffslide)"]
