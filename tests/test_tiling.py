import h5py
import numpy as np
import pytest
from conftest import CMU, needs_real

from wsi_mil.config import Config, TilingConfig, load_config
from wsi_mil.h5io import read_coords
from wsi_mil.layout import Layout
from wsi_mil.slide import SlideRef, open_slide
from wsi_mil.stages.tile import compute_tiles, tile_slide
from wsi_mil.tiling import box_fractions, grid_axes, make_grid


def test_box_fractions_equal_a_brute_force_count():
    rng = np.random.default_rng(0)
    mask = rng.random((120, 150)) > 0.6
    scale, size0 = 8.0, 37.0
    xs, ys = grid_axes(150 * 8, 120 * 8, size0, 29.0)
    gx, gy = np.meshgrid(xs, ys)
    got = box_fractions(mask, scale, gx.ravel(), gy.ravel(), size0)
    for x, y, f in zip(gx.ravel()[::17], gy.ravel()[::17], got[::17]):
        x0, y0 = int(round(x / scale)), int(round(y / scale))
        x1, y1 = max(int(round((x + size0) / scale)), x0 + 1), max(int(round((y + size0) / scale)), y0 + 1)
        assert f == pytest.approx(mask[y0:y1, x0:x1].mean(), abs=1e-6)


def test_grid_is_row_major_inside_the_slide_and_filters_by_tissue():
    mask = np.zeros((100, 100), bool)
    mask[:, :50] = True  # left half is tissue
    grid = make_grid(1000, 800, 0.5, mask, 10.0, TilingConfig(target_mpp=0.5, patch_size=100))
    c = grid.coords
    assert c.dtype == np.int64 and c.shape[1] == 2
    order = np.lexsort((c[:, 0], c[:, 1]))
    np.testing.assert_array_equal(order, np.arange(len(c)))  # y outer, x inner
    assert (c[:, 0] + 100 <= 1000).all() and (c[:, 1] + 100 <= 800).all()
    assert c[:, 0].max() < 500 and len(c) == 5 * 8


def test_overlap_halves_the_step():
    mask = np.ones((50, 50), bool)
    a = make_grid(1000, 1000, 1.0, mask, 20.0, TilingConfig(target_mpp=1.0, patch_size=100))
    b = make_grid(1000, 1000, 1.0, mask, 20.0, TilingConfig(target_mpp=1.0, patch_size=100, overlap=0.5))
    assert len(a.coords) == 100 and len(b.coords) == 19 * 19
    assert b.step_level0 == 50 and b.patch_size_level0 == 100


def test_same_physical_grid_at_two_scan_resolutions(slide_factory):
    """The same tissue written at 0.25 and at 0.5 µm/px gives the same grid in micrometres."""
    fine = slide_factory("phys_fine", width=4800, height=4000, mpp=0.25, seed=31)
    coarse = slide_factory("phys_coarse", width=2400, height=2000, mpp=0.5, seed=31)
    cfg = Config()
    with open_slide(fine) as r:
        a = compute_tiles(r, cfg, "fine")
    with open_slide(coarse) as r:
        b = compute_tiles(r, cfg, "coarse")
    assert a.spec.patch_size_level0 == 512 and b.spec.patch_size_level0 == 256
    assert a.spec.patch_level == 1 and b.spec.patch_level == 0  # read at 0.5 µm/px on both
    um_a = {tuple(v) for v in (a.grid.coords * 0.25).tolist()}
    um_b = {tuple(v) for v in (b.grid.coords * 0.5).tolist()}
    assert len(um_a) > 20
    assert len(um_a ^ um_b) <= 0.05 * len(um_a | um_b)


def test_patch_file_layout(slide_factory, tmp_path):
    path = slide_factory("gt11", width=2400, height=2000, mpp=0.5, seed=11, tumour=True)
    cfg = load_config(None, ["tiling.target_mpp=0.6", "tiling.patch_size=224"])
    tile_slide(SlideRef("gt11", path), cfg, Layout(tmp_path))
    layout = Layout(tmp_path)
    coords, attrs = read_coords(layout.patches("gt11"))
    assert len(coords) > 10
    for key in ("patch_size", "patch_level", "downsample", "level_dim", "name", "patch_size_level0",
                "level0_magnification", "target_magnification", "patch_size_target", "overlap_fraction",
                "target_mpp", "slide_mpp", "level0_width", "level0_height", "overlap", "tissue_params"):
        assert key in attrs, key
    # patch_size is the edge at patch_level (level 0 here: 0.5 µm/px <= 0.6), our target edge is kept apart
    assert attrs["patch_level"] == 0 and attrs["patch_size"] == attrs["patch_size_level0"] == round(224 * 0.6 / 0.5)
    assert attrs["patch_size_target"] == 224 and attrs["target_mpp"] == 0.6 and attrs["name"] == "gt11"
    assert attrs["level0_width"] == 2400
    with h5py.File(layout.patches("gt11")) as fh:
        assert fh["coords"].dtype == np.int64 and fh["coords"].shape == (len(coords), 2)
    for kind in ("mask.png", "qc.png", "grid.png", "tissue.geojson"):
        assert layout.mask("gt11", kind).stat().st_size > 0


@needs_real
def test_real_slide_patches_lie_on_the_section_and_backends_agree(tmp_path):
    coords = {}
    for backend in ("openslide", "tiffslide"):
        cfg = load_config(None, [f"slides.backend={backend}"])
        with open_slide(CMU, cfg.slides) as r:
            res = compute_tiles(r, cfg, "cmu")
            coords[backend] = res.grid.coords
            size = res.spec.patch_size_level0
            means = [r.read_region(tuple(c), 0, (size, size)).mean() for c in res.grid.coords[::5]]
    np.testing.assert_array_equal(coords["openslide"], coords["tiffslide"])
    assert len(coords["openslide"]) > 20
    assert np.mean(means) < 215  # patches hold stained tissue, not white glass
