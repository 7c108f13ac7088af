import json

import cv2
import numpy as np
import pytest
from conftest import CMU, iou, needs_real

from wsi_mil.config import Config, TissueConfig, load_config
from wsi_mil.slide import open_slide
from wsi_mil.stages.tile import segment
from wsi_mil.synthetic import load_truth
from wsi_mil.tissue import detect_tissue, geojson_to_mask, mask_to_geojson


def _mask_vs_truth(path, truth_dir, name, cfg=None):
    cfg = cfg or Config()
    with open_slide(path) as r:
        _, mask, scale, _ = segment(r, cfg, path.stem)
    truth, _ = load_truth(truth_dir, path.stem, name)
    mask = cv2.resize(mask.astype(np.uint8), truth.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    return mask, truth


@pytest.mark.parametrize("seed, mpp", [(11, 0.5), (12, 0.25), (13, 0.5)])
def test_mask_matches_ground_truth(slide_factory, seed, mpp):
    path = slide_factory(f"gt{seed}", width=int(2400 * 0.5 / mpp), height=int(2000 * 0.5 / mpp), mpp=mpp,
                         seed=seed, tumour=seed % 2 == 1)
    mask, truth = _mask_vs_truth(path, slide_factory.truth, "tissue")
    assert truth.sum() > 0.1 * truth.size
    assert iou(mask, truth) >= 0.9


def test_pen_marks_are_excluded(slide_factory):
    path = slide_factory("pen", width=3000, height=2400, mpp=0.5, seed=21, pen=True, tumour=True)
    mask, pen = _mask_vs_truth(path, slide_factory.truth, "pen")
    tissue, _ = load_truth(slide_factory.truth, "pen", "tissue")
    core = cv2.erode(pen.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0  # away from blended borders
    assert core.sum() > 50
    assert (mask & core).sum() / core.sum() < 0.05
    assert iou(mask, tissue & ~pen) >= 0.8
    # with pen removal off, the ink is taken as tissue: the test can tell the difference
    off = load_config(None, ["tissue.remove_pen=false"])
    mask_off, _ = _mask_vs_truth(path, slide_factory.truth, "pen", off)
    assert (mask_off & core).sum() / core.sum() > 0.5


def test_blank_image_has_no_tissue():
    rgb = np.full((300, 400, 3), 243, np.uint8)
    rgb += np.random.default_rng(0).integers(0, 6, rgb.shape, dtype=np.uint8)
    assert not detect_tissue(rgb, 8.0).any()


def test_areas_are_physical():
    """A 600 µm tissue disc survives at 2 and 16 µm/px; a 60 µm speck does not, whatever the resolution."""
    cfg = TissueConfig(min_area_um2=20000, remove_black=False)
    for mpp in (2.0, 16.0):
        size = int(3000 / mpp)
        img = np.full((size, size, 3), 245, np.uint8)
        cv2.circle(img, (size // 3, size // 2), int(300 / mpp), (200, 120, 190), -1)
        cv2.circle(img, (2 * size // 3, size // 2), max(1, int(30 / mpp)), (200, 120, 190), -1)
        mask = detect_tissue(img, mpp, cfg)
        assert mask[size // 2, size // 3]
        assert not mask[size // 2, 2 * size // 3]


def test_geojson_round_trip_keeps_holes():
    mask = np.zeros((200, 300), bool)
    cv2.circle(mask.view(np.uint8), (150, 100), 80, 1, -1)
    cv2.circle(mask.view(np.uint8), (150, 100), 25, 0, -1)
    gj = mask_to_geojson(mask, scale=32.0)
    feature = gj["features"][0]
    assert feature["properties"]["objectType"] == "annotation"
    rings = feature["geometry"]["coordinates"]
    assert len(rings) == 2 and all(r[0] == r[-1] for r in rings)
    xs = [p[0] for p in rings[0]]
    assert 70 * 32 <= min(xs) <= 71 * 32 + 32 and max(xs) <= 231 * 32  # level-0 pixels
    back = geojson_to_mask(json.loads(json.dumps(gj)), mask.shape, 32.0)
    assert not back[100, 150]  # the hole stays a hole
    assert iou(back, mask) > 0.95


def test_user_geojson_replaces_the_automatic_mask(slide_factory, tmp_path):
    path = slide_factory("gt11", width=2400, height=2000, mpp=0.5, seed=11, tumour=True)
    w0, h0 = 2400, 2000
    square = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": {
        "type": "Polygon", "coordinates": [[[0, 0], [w0 / 2, 0], [w0 / 2, h0 / 2], [0, h0 / 2], [0, 0]]]}}]}
    (tmp_path / f"{path.stem}.geojson").write_text(json.dumps(square))
    cfg = load_config(None, {"tissue": {"geojson_dir": str(tmp_path)}})
    with open_slide(path) as r:
        _, mask, scale, source = segment(r, cfg, path.stem)
    assert source == "user_geojson"
    assert abs(mask.mean() - 0.25) < 0.02
    assert mask[: mask.shape[0] // 2 - 2, : mask.shape[1] // 2 - 2].all()


@needs_real
def test_real_slide_tissue_is_the_central_section():
    with open_slide(CMU) as r:
        thumb, mask, scale, _ = segment(r, Config(), "cmu")
    assert 0.15 < mask.mean() < 0.8
    h, w = mask.shape
    assert mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4].mean() > mask.mean()  # the section is central
    # the tissue is where the slide is not white
    assert thumb[mask].mean() < thumb[~mask].mean() - 20


@pytest.mark.parametrize("density", [0.0005, 0.002, 0.2])  # a few components, dozens, and many specks
def test_small_components_are_removed_exactly_as_skimage_does(density):
    from skimage.morphology import remove_small_objects

    from wsi_mil.tissue import _remove_small

    rng = np.random.default_rng(int(density * 1000))
    mask = cv2.dilate((rng.random((400, 500)) < density).astype(np.uint8), np.ones((3, 3), np.uint8),
                      iterations=int(rng.integers(1, 4)))
    mask[50:200, 60:300] = 1  # one large component
    mask[0:4, 0:5], mask[-3:, 200:203], mask[100:400, -2:] = 1, 1, 1  # small ones and a long one on the edges
    mask[120:130, 100:110] = 0  # a hole in the large one, with an island inside
    mask[124:126, 104:106] = 1
    for min_px in (2, 30, 200):
        expected = remove_small_objects(mask.astype(bool), max_size=min_px - 1, connectivity=2)
        got = _remove_small(mask, min_px)
        assert got.dtype == np.uint8 and np.array_equal(got.astype(bool), expected), min_px
        holes = remove_small_objects(~mask.astype(bool), max_size=min_px - 1, connectivity=2)  # the glass too
        assert np.array_equal(_remove_small(1 - mask, min_px).astype(bool), holes), min_px


def test_qc_images_are_capped_and_the_mask_keeps_full_resolution(slide_factory, tmp_path):
    import h5py

    from wsi_mil.layout import Layout
    from wsi_mil.qc import QC_SIDE
    from wsi_mil.slide import SlideRef
    from wsi_mil.stages.tile import QC_MAX_SIDE, tile_slide

    path = slide_factory("qc_big", width=4096, height=3072, mpp=0.5, seed=5, tumour=True)
    cfg = load_config(None, ["tissue.mpp=0.75"])  # a 2731 x 2048 px mask
    tile_slide(SlideRef("qc_big", path), cfg, Layout(tmp_path))
    layout = Layout(tmp_path)
    with h5py.File(layout.patches("qc_big")) as fh:
        mask = fh["tissue_mask"][:]
    assert max(mask.shape) == round(4096 * 0.5 / 0.75)
    for kind, cap in (("qc.png", QC_SIDE[1]), ("grid.png", QC_SIDE[1]), ("mask.png", QC_MAX_SIDE)):
        img = cv2.imread(str(layout.mask("qc_big", kind)))
        assert max(img.shape[:2]) == min(cap, max(mask.shape)), kind
        assert abs(img.shape[1] / img.shape[0] - mask.shape[1] / mask.shape[0]) < 0.01, kind


@pytest.mark.parametrize("pen,black", [(True, True), (True, False), (False, True)])
def test_pen_and_debris_rules_hold_on_every_hsv_value(pen, black):
    """The documented ink rules, restated in numpy, against the lookup-table implementation on random
    HSV pixels (every hue, saturation and value), before the 3x3 dilation."""
    from wsi_mil.tissue import pen_and_debris_mask

    rng = np.random.default_rng(3)
    hsv = np.stack([rng.integers(0, 181, (300, 300)), rng.integers(0, 256, (300, 300)),
                    rng.integers(0, 256, (300, 300))], -1).astype(np.uint8)
    h, s, v = (hsv[..., i].astype(int) for i in range(3))
    ink = (((35 <= h) & (h <= 95) & (s > 50)) | ((95 < h) & (h <= 128) & (s > 90))
           | (((h <= 8) | (h >= 172)) & (s > 140) & (v < 235)))
    expected = (ink & pen) | ((v < 45) & black)
    expected = cv2.dilate(expected.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    cfg = TissueConfig(remove_pen=pen, remove_black=black)
    got = pen_and_debris_mask(np.zeros_like(hsv), cfg, hsv)
    assert expected.any() and np.array_equal(got, expected)
