import os
import subprocess
import sys
import time
from types import SimpleNamespace

import cv2
import h5py
import numpy as np
import pytest
import tifffile
import timm
import torch
from safetensors.torch import save_file

from wsi_mil.cli import main
from wsi_mil.config import EncoderConfig, load_config
from wsi_mil.device import native_bf16
from wsi_mil.errors import WsiMilError
from wsi_mil.features.encoders import PRESETS, build_encoder
from wsi_mil.formats import PatchSpec
from wsi_mil.h5io import read_coords
from wsi_mil.layout import Layout, encoder_id
from wsi_mil.runner import read_manifest
from wsi_mil.slide import SlideRef
from wsi_mil.stages.extract import extract_slide
from wsi_mil.stages.tile import tile_slide
from wsi_mil.synthetic import SyntheticSpec, write_slide

SMALL = ["encoder.name=resnet18", "encoder.pretrained=false", "extract.batch_size=16", "extract.num_workers=0"]


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    path = root / "slides" / "ex1.svs"
    path.parent.mkdir()
    write_slide(path, SyntheticSpec(width=2304, height=1792, mpp=0.5, seed=41, tumour=True))
    tile_slide(SlideRef("ex1", path), load_config(), Layout(root / "out"))
    return root, path


def _manual_forward(model, mean, std, patch_rgb):
    x = patch_rgb.astype(np.float32) / 255.0
    x = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
    with torch.inference_mode():
        return model(torch.from_numpy(x).permute(2, 0, 1)[None]).numpy()[0]


def _read_alone(path, attrs, coord, size):
    import openslide

    with openslide.OpenSlide(str(path)) as s:
        region = np.asarray(s.read_region(tuple(int(v) for v in coord), int(attrs["patch_level"]),
                                          (int(attrs["patch_size_level"]),) * 2).convert("RGB"))
    return cv2.resize(region, (size, size), interpolation=cv2.INTER_AREA)


def test_each_row_is_the_models_output_on_that_patch_read_alone(tiled):
    root, path = tiled
    out = root / "out"
    cfg = load_config(None, SMALL + ["extract.read_group=8", "extract.precision=fp32"])
    extract_slide(SlideRef("ex1", path), cfg, Layout(out))
    with h5py.File(Layout(out).features(encoder_id(cfg.encoder.name), "ex1")) as fh:
        feats, coords = fh["features"][:], fh["coords"][:]
        attrs = dict(fh["coords"].attrs)
    tiled_coords, _ = read_coords(out / "patches" / "ex1.h5")
    np.testing.assert_array_equal(coords, tiled_coords)  # rows follow the patch file's order
    from wsi_mil.features.engine import prepared_encoder

    prep = prepared_encoder(cfg.encoder, cfg.extract)
    model = prep.encoder.model.float().to(memory_format=torch.contiguous_format)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(coords), size=5, replace=False):
        ref = _manual_forward(model, prep.encoder.mean, prep.encoder.std,
                              _read_alone(path, attrs, coords[i], prep.encoder.input_size))
        np.testing.assert_allclose(feats[i], ref, rtol=1e-3, atol=1e-4)
    assert feats.shape[1] == prep.encoder.dim == 512


def test_grouped_reads_equal_single_reads(tiled, tmp_path):
    root, path = tiled
    from wsi_mil.features.dataset import patch_dataset

    coords, attrs = read_coords(root / "out" / "patches" / "ex1.h5")
    a = patch_dataset(path, coords, PatchSpec.from_attrs(attrs), 224, group=1).__getitems__(list(range(len(coords))))
    b = patch_dataset(path, coords, PatchSpec.from_attrs(attrs), 224, group=8).__getitems__(list(range(len(coords))))
    assert len(coords) > 8
    assert torch.equal(a["image"], b["image"])


def test_missing_patch_file_is_a_clear_error(tiled, tmp_path):
    _, path = tiled
    with pytest.raises(WsiMilError, match="run 'wsi-mil tile' first"):
        extract_slide(SlideRef("ex1", path), load_config(None, SMALL), Layout(tmp_path))


def test_output_layout_and_attrs_readable_like_clam_trident_torchmil(tiled):
    root, path = tiled
    out = root / "out"
    cfg = load_config(None, SMALL + ["extract.feature_dtype=float16"])
    extract_slide(SlideRef("ex1", path), cfg, Layout(out))
    f = Layout(out).features(encoder_id(cfg.encoder.name), "ex1")
    assert f.parent.name == "resnet18"
    with h5py.File(f, "r") as fh:  # CLAM: features + coords, then torch.from_numpy
        feats = torch.from_numpy(fh["features"][:])
        coords = fh["coords"][:]
        assert fh["features"].dtype == np.float16
        assert fh["features"].chunks[0] > 1  # not one row per chunk
        a = fh["features"].attrs
        assert a["encoder"] == "resnet18" and a["feature_dim"] == 512 and a["weights_source"] == "random_init"
        assert a["precision"] == ("bf16" if native_bf16() else "fp32")  # auto on the CPU: a timm model runs bf16
        assert a["target_mpp"] == 0.5 and a["patch_size"] == 256
        # TRIDENT: the patch geometry sits on coords
        c = fh["coords"].attrs
        assert c["patch_size_level0"] == 256 and c["name"] == "ex1" and "level0_width" in c
    assert feats.shape == (len(coords), 512) and coords.shape[1] == 2
    bag = feats.float().unsqueeze(0)  # torchmil: a bag tensor (1, N, D)
    assert torch.isfinite(bag).all() and bag.shape[1] > 0


def test_local_weights_round_trip_and_key_mismatch(tiled, tmp_path):
    root, path = tiled
    torch.manual_seed(3)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    st = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(st))
    pth = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, pth)
    coords, attrs = read_coords(root / "out" / "patches" / "ex1.h5")
    outs = []
    for wfile in (st, pth):
        cfg = load_config(None, [f"encoder.weights={wfile}", "encoder.name=resnet18", "extract.num_workers=0",
                                      "extract.precision=fp32"])
        o = tmp_path / wfile.suffix[1:]
        (o / "patches").mkdir(parents=True)
        (o / "patches" / "ex1.h5").write_bytes((root / "out" / "patches" / "ex1.h5").read_bytes())
        extract_slide(SlideRef("ex1", path), cfg, Layout(o))
        with h5py.File(Layout(o).features(encoder_id(cfg.encoder.name), "ex1")) as fh:
            outs.append(fh["features"][:])
            assert fh["features"].attrs["weights_sha256"] != "none"
    np.testing.assert_array_equal(outs[0], outs[1])
    ref = _manual_forward(model, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                          _read_alone(path, attrs, coords[0], 224))
    np.testing.assert_allclose(outs[0][0], ref, rtol=1e-3, atol=1e-4)
    other = tmp_path / "r34.safetensors"
    save_file(timm.create_model("resnet34", num_classes=0).state_dict(), str(other))
    with pytest.raises(WsiMilError, match="does not fit encoder 'resnet18'.*unexpected keys"):
        build_encoder(EncoderConfig(name="resnet18", weights=other))


def test_offline_pretrained_gives_one_line_pointing_to_local_weights(tiled, tmp_path):
    root, _ = tiled
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "wsi_mil.cli", "extract", "--slides", str(root / "slides"),
                        "--out", str(tmp_path), "encoder.name=resnet18"], capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert r.stderr.startswith("error: encoder 'resnet18': could not get pretrained weights from the hub")
    assert "encoder.weights=" in r.stderr and r.stderr.count("\n") == 1


def test_presets_have_their_published_widths_and_a_registry():
    expected = {"resnet50_trunc": 1024, "uni": 1024, "uni2_h": 1536, "h_optimus_0": 1536,
                "virchow2": 2560, "gigapath": 1536, "phikon": 768}
    assert set(expected) <= set(PRESETS)
    for name, dim in expected.items():
        with torch.device("meta"):
            enc = build_encoder(EncoderConfig(name=name, pretrained=False))
        assert enc.dim == dim, name
        assert enc.input_size == 224 and len(enc.mean) == 3
    assert PRESETS["h_optimus_0"].mean != PRESETS["uni"].mean


def test_zero_patches_give_an_empty_bag(tmp_path):
    path = tmp_path / "slides" / "glass.svs"
    path.parent.mkdir()
    write_slide(path, SyntheticSpec(width=1024, height=1024, mpp=0.5, blank=True))
    out = tmp_path / "out"
    assert main(["tile", "--slides", str(path.parent), "--out", str(out), "--no-progress"]) == 0
    assert main(["extract", "--slides", str(path.parent), "--out", str(out), "--no-progress", *SMALL]) == 0
    with h5py.File(out / "features" / "resnet18" / "glass.h5") as fh:
        assert fh["features"].shape == (0, 512) and fh["coords"].shape == (0, 2)
    rows = {(r["slide_id"], r["stage"]): r for r in read_manifest(out / "manifest.csv")}
    assert rows[("glass", "tile")]["reason"] == "no tissue found: 0 patches"
    assert rows[("glass", "extract")]["reason"] == "0 patches: empty bag written"


def test_an_undecodable_tile_becomes_a_counted_blank_patch(tmp_path):
    path = tmp_path / "slides" / "bad.svs"
    path.parent.mkdir()
    write_slide(path, SyntheticSpec(width=2048, height=2048, mpp=0.5, seed=44))
    out = tmp_path / "out"
    tile_slide(SlideRef("bad", path), load_config(), Layout(out))
    coords, _ = read_coords(out / "patches" / "bad.h5")
    x, y = coords[len(coords) // 2]
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tiles_x = (page.imagewidth + page.tilewidth - 1) // page.tilewidth
        k = (y // page.tilewidth) * tiles_x + x // page.tilewidth
        offset, count = page.dataoffsets[k], page.databytecounts[k]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(np.random.default_rng(0).integers(0, 256, count, dtype=np.uint8).tobytes())
    cfg = load_config(None, SMALL)
    note = extract_slide(SlideRef("bad", path), cfg, Layout(out))
    assert "1 undecodable tile(s)" in note
    with h5py.File(Layout(out).features(encoder_id(cfg.encoder.name), "bad")) as fh:
        assert fh["features"].attrs["n_failed_patches"] == 1
        assert list(fh["features"].attrs["failed_patch_indices"]) == [len(coords) // 2]
        assert np.isfinite(fh["features"][:]).all()


def test_auto_precision_on_the_cpu_is_bf16_only_for_bf16_encoders_where_the_cpu_has_it(monkeypatch):
    import wsi_mil.device as device_mod
    from wsi_mil.features.engine import Prepared, pick_precision

    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(device_mod, "native_bf16", lambda native=native: native)
        picked = {p: pick_precision("auto", cpu, SimpleNamespace(gpu_precision=p)) for p in ("bf16", "fp16", "fp32")}
        assert picked["bf16"] == ("bf16" if native else "fp32") and picked["fp16"] == picked["fp32"] == "fp32"
    assert pick_precision("fp16", cpu, SimpleNamespace(gpu_precision="fp32")) == "fp16"  # asked for: as asked
    # bf16 on the CPU gives the fp32 features to within bf16's rounding (a random resnet18, 4 random patches)
    cfg = load_config(None, SMALL)
    encoder = build_encoder(cfg.encoder)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8))
    feats = {}
    for prec in ("fp32", "bf16"):
        prep = Prepared.create(encoder, cfg.extract.model_copy(update={"precision": prec, "device": "cpu"}))
        with torch.inference_mode():
            feats[prec] = prep.forward_uint8(images).double()
    cos = torch.nn.functional.cosine_similarity(feats["bf16"], feats["fp32"], dim=1)
    assert not torch.equal(feats["bf16"], feats["fp32"]) and cos.min().item() >= 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_amp_features_are_close_to_fp32(tiled, tmp_path):
    root, path = tiled
    feats = {}
    for prec in ("fp32", "bf16", "fp16"):
        cfg = load_config(None, ["encoder.name=resnet18", "encoder.pretrained=false", "extract.device=cuda",
                                 f"extract.precision={prec}"])
        o = tmp_path / prec
        (o / "patches").mkdir(parents=True)
        (o / "patches" / "ex1.h5").write_bytes((root / "out" / "patches" / "ex1.h5").read_bytes())
        torch.manual_seed(0)
        extract_slide(SlideRef("ex1", path), cfg, Layout(o))
        with h5py.File(Layout(o).features(encoder_id(cfg.encoder.name), "ex1")) as fh:
            feats[prec] = fh["features"][:]
            assert fh["features"].attrs["device"] == "cuda"
    ref = torch.from_numpy(feats["fp32"]).double()
    for prec in ("bf16", "fp16"):
        cos = torch.nn.functional.cosine_similarity(torch.from_numpy(feats[prec]).double(), ref, dim=1)
        assert np.isfinite(feats[prec]).all()
        assert cos.min().item() >= 0.99, (prec, cos.min().item())


def test_decoding_workers_end_when_the_extracting_process_is_killed(tiled):
    """The DataLoader workers' parent is the fork server, which outlives a ``kill -9`` of extract; they watch
    the extracting process instead, and the fork server follows them."""
    import psutil

    root, path = tiled
    cmd = [sys.executable, "-m", "wsi_mil.cli", "extract", "--slides", str(path.parent), "--out",
           str(root / "out"), "--no-progress", "--overwrite", "encoder.name=resnet50", "encoder.pretrained=false",
           "extract.batch_size=1", "extract.num_workers=2"]
    proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        deadline, workers = time.time() + 120, []
        while len(workers) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
            workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.ppid() != proc.pid]
        assert len(workers) == 2
        helpers = psutil.Process(proc.pid).children(recursive=True)  # the fork server and resource tracker too
        proc.kill()
        proc.wait(30)
        _, alive = psutil.wait_procs(helpers, timeout=20)
        assert not alive, [p.cmdline()[-1][:60] for p in alive]
    finally:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
