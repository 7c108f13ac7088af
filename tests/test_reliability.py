"""Defects found by a hostile probe, each reproduced for real: SIGKILLed training, retraining into the same
run, awkward names, a full disk, user files in odd encodings, stale locks and truncated outputs."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest

from wsi_mil.atomic import HOST, TMP_TAG
from wsi_mil.cli import main
from wsi_mil.formats import read_feature_coords, read_feature_spec, read_patch_file
from wsi_mil.h5io import write_h5
from wsi_mil.heatmap import export
from wsi_mil.layout import Layout
from wsi_mil.runner import read_manifest, run_batch
from wsi_mil.slide import SlideReader, SlideRef
from wsi_mil.synthetic import SyntheticSpec, write_slide

ENC = ["encoder.name=resnet18", "encoder.pretrained=false", "extract.num_workers=0", "extract.batch_size=16"]
SMALL_MODEL = ["model.hidden_dim=16", "model.attention_dim=8"]


def _rows(out: Path) -> dict:
    return {(r["slide_id"], r["stage"]): r for r in read_manifest(out / "manifest.csv")}


def _one_slide_folder(tmp_path: Path, slide: Path) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    os.symlink(slide, folder / slide.name)
    return folder


def _cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsi_mil.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=600)


def _one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    """20 small 12-d bags (a labelled feature folder like extract's) for training tests."""
    root = tmp_path_factory.mktemp("bags")
    feats = root / "out" / "features" / "feats"
    rng = np.random.default_rng(0)
    rows = ["slide_id,label,patient_id"]
    for i in range(20):
        label = i % 2
        x = rng.standard_normal((30, 12)).astype(np.float32)
        x[:5, 0] += 3 * label
        sid = f"b{i:02d}"
        write_h5(feats / f"{sid}.h5", {"features": x, "coords": np.zeros((30, 2), np.int64)},
                 {"features": {"encoder_id": "feats", "feature_dim": 12}})
        rows.append(f"{sid},{'tumour' if label else 'normal'},P{i}")
    labels = root / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return root / "out", labels


# -- training runs are complete or absent ---------------------------------------------------------------

def test_a_killed_train_leaves_no_run_that_predict_would_use(bags, tmp_path):
    out, labels = bags
    work = tmp_path / "out"
    (work / "features").mkdir(parents=True)
    os.symlink(out / "features" / "feats", work / "features" / "feats")
    proc = subprocess.Popen([sys.executable, "-m", "wsi_mil.cli", "train", "--out", str(work), "--no-progress",
                             "encoder.name=feats", f"train.labels={labels}", "train.folds=4", "train.epochs=150",
                             "train.min_epochs=150", "train.val_fraction=0", *SMALL_MODEL], start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((work / "models").glob(".*/fold_1.safetensors")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((work / "models").glob(".*/fold_1.safetensors")), "train was killed before two folds were saved"
    assert not (work / "models" / "default").exists()  # the half-built run never took the run's name
    _one_line_error(_cli("predict", "--out", work, "--no-progress"), "models/default")
    # a folder that an older version left half-written (folds, no summary) is refused the same way
    partial = work / "models" / "default"
    partial.mkdir()
    for f in sorted((work / "models").glob(".*/fold_*.safetensors")):
        (partial / f.name).write_bytes(f.read_bytes())
    _one_line_error(_cli("predict", "--out", work, "--no-progress"), "not a complete training run")
    # retraining replaces it whole and cleans the dead run's temp folder
    assert main(["train", "--out", str(work), "--no-progress", "encoder.name=feats", f"train.labels={labels}",
                 "train.folds=2", "train.epochs=2", *SMALL_MODEL]) == 0
    assert sorted(p.name for p in partial.glob("fold_*")) == ["fold_0.safetensors", "fold_1.safetensors"]
    assert not [p for p in (work / "models").iterdir() if p.name.startswith(".")]


def test_retraining_with_fewer_folds_leaves_no_old_fold_and_predict_uses_the_new_run(bags, tmp_path):
    out, labels = bags
    common = ["--out", str(out), "--no-progress", "encoder.name=feats", f"train.labels={labels}",
              "train.epochs=2", "train.run_name=refold", *SMALL_MODEL]
    assert main(["train", *common, "train.folds=4"]) == 0
    run = Layout(out).run_dir("refold")
    assert len(list(run.glob("fold_*.safetensors"))) == 4
    assert main(["train", *common, "train.folds=2"]) == 0
    assert sorted(p.name for p in run.glob("fold_*.safetensors")) == ["fold_0.safetensors", "fold_1.safetensors"]
    proc = _cli("predict", "--out", out, "--model", run, "--no-progress")
    assert proc.returncode == 0 and "with 2 model(s)" in proc.stdout, proc.stdout + proc.stderr


def test_user_errors_are_one_line_and_exit_2(bags, tmp_path):
    out, labels = bags
    latin = tmp_path / "labels_latin1.csv"
    latin.write_bytes("slide_id,label\nb00,tumeur maligne é\n".encode("latin-1"))
    _one_line_error(_cli("train", "--out", out, "encoder.name=feats", f"train.labels={latin}"), "not UTF-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes("train:\n  run_name: é\n".encode("latin-1"))
    _one_line_error(_cli("config", "--config", cfg), "not UTF-8")
    slides_csv = tmp_path / "slides.csv"
    slides_csv.write_bytes("path\nx.svs\n".encode("utf-16"))
    _one_line_error(_cli("tile", "--slides", slides_csv, "--out", tmp_path / "o"), "not UTF-8")
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"PK\x03\x04 not a checkpoint")
    _one_line_error(_cli("predict", "--out", out, "--model", junk), "not a safetensors checkpoint")
    pickle = tmp_path / "model.pt"
    pickle.write_bytes(b"\x80\x04K\x01.")
    _one_line_error(_cli("predict", "--out", out, "--model", pickle), "not a .safetensors checkpoint")
    _one_line_error(_cli("config", "tiling.target_mpp=.inf"), "tiling.target_mpp")
    _one_line_error(_cli("config", "heatmap.mpp=nan"), "heatmap.mpp")


def test_a_bom_on_labels_and_slide_csvs_is_accepted(bags, tmp_path, slide_factory):
    out, labels = bags
    bom = tmp_path / "labels_bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + labels.read_bytes())
    assert main(["train", "--out", str(out), "--no-progress", "encoder.name=feats", f"train.labels={bom}",
                 "train.folds=2", "train.epochs=1", "train.run_name=bom", *SMALL_MODEL]) == 0
    slide = slide_factory("bom1", width=1500, height=1500, mpp=0.5, seed=3)
    slides = tmp_path / "slides.csv"
    slides.write_bytes(b"\xef\xbb\xbfpath\n" + str(slide).encode() + b"\n")
    assert main(["tile", "--slides", str(slides), "--out", str(tmp_path / "o"), "--no-progress"]) == 0


@contextmanager
def mounted(path: Path, options: str):
    """A tmpfs mounted at ``path`` (skips the test where this machine cannot mount one)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:80]})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_read_only_out_is_one_line_even_when_every_output_exists(tmp_path, slide_factory):
    slides = _one_slide_folder(tmp_path, slide_factory("ro1", width=1500, height=1500, mpp=0.5, seed=4))
    with mounted(tmp_path / "ro", "size=8m") as mnt:
        assert main(["tile", "--slides", str(slides), "--out", str(mnt), "--no-progress"]) == 0
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        _one_line_error(_cli("tile", "--slides", slides, "--out", mnt), "not writable")


def test_a_full_disk_during_extract_fails_slides_cleanly_and_the_rerun_completes(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(3):
        write_slide(slides / f"d{i}.svs", SyntheticSpec(width=2048, height=2048, mpp=0.5, seed=80 + i))
    with mounted(tmp_path / "full", "size=4m") as mnt:
        out = mnt / "out"
        assert main(["tile", "--slides", str(slides), "--out", str(out), "--no-progress"]) == 0
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * max(0, free - 48 * 1024))  # ~48 KB left: a manifest row fits, features don't
        proc = _cli("extract", "--slides", slides, "--out", out, "--no-progress", *ENC)
        assert proc.returncode == 1, (proc.returncode, proc.stderr[-1500:])  # not a crash (139)
        rows = _rows(out)
        for i in range(3):
            assert rows[(f"d{i}", "extract")]["status"] == "failed"
            assert "No space left on device" in rows[(f"d{i}", "extract")]["reason"]
        assert not list((out / ".locks").rglob("*.lock"))
        assert not [p for p in out.rglob("*") if TMP_TAG in p.name]
        filler.unlink()
        assert main(["extract", "--slides", str(slides), "--out", str(out), "--no-progress", *ENC]) == 0
        assert all(_rows(out)[(f"d{i}", "extract")]["status"] == "done" for i in range(3))


def test_an_injected_enospc_fails_each_slide_and_even_an_unwritable_manifest_does_not_stop_the_batch(
        tmp_path, monkeypatch, capsys):
    """The same behaviour without a mount: every write of the features file and of manifest.csv fails."""
    import errno

    from wsi_mil import atomic

    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(2):
        write_slide(slides / f"e{i}.svs", SyntheticSpec(width=1536, height=1536, mpp=0.5, seed=70 + i))
    out = tmp_path / "out"
    assert main(["tile", "--slides", str(slides), "--out", str(out), "--no-progress"]) == 0
    real = atomic.write_bytes

    def full(path, data):
        if Path(path).suffix in (".h5", ".csv"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(atomic, "write_bytes", full)
    monkeypatch.setattr("wsi_mil.h5io.write_bytes", full)
    assert main(["extract", "--slides", str(slides), "--out", str(out), "--no-progress", *ENC]) == 1
    err = capsys.readouterr().err
    assert "extract" in err and "could not be written" in err and err.count("No space left on device") >= 2
    assert not list((out / ".locks").rglob("*.lock"))
    monkeypatch.undo()
    assert main(["extract", "--slides", str(slides), "--out", str(out), "--no-progress", *ENC]) == 0


# -- resume skips only complete outputs -----------------------------------------------------------------

def test_outputs_truncated_outside_our_tools_are_redone_not_skipped(tmp_path, slide_factory):
    slides = _one_slide_folder(tmp_path, slide_factory("tr1", width=2000, height=1600, mpp=0.5, seed=6))
    out = tmp_path / "out"
    layout = Layout(out)
    run = ["--slides", str(slides), "--out", str(out), "--no-progress", *ENC]
    assert main(["tile", *run]) == 0 and main(["extract", *run]) == 0
    for stage, path in (("tile", layout.patches("tr1")), ("extract", layout.features("resnet18", "tr1"))):
        good = path.read_bytes()
        path.write_bytes(good[: len(good) // 3])
        assert main([stage, *run]) == 0
        assert _rows(out)[("tr1", stage)]["reason"] != "complete output exists"
        assert path.stat().st_size == len(good)
    with h5py.File(layout.features("resnet18", "tr1")) as fh:
        assert fh["features"].shape[0] == fh["coords"].shape[0] > 0


def test_patches_and_features_of_older_settings_are_redone_not_skipped(tmp_path, slide_factory, capsys):
    slides = _one_slide_folder(tmp_path, slide_factory("st1", width=2400, height=1800, mpp=0.5, seed=9))
    out = tmp_path / "out"
    feats = Layout(out).features("resnet18", "st1")
    run = ["--slides", str(slides), "--out", str(out), "--no-progress", *ENC]
    kept = "extract: 0 done, 0 failed, 1 skipped"

    def extract(*extra) -> str:
        """'kept', or the manifest's reason for the slide it redid."""
        capsys.readouterr()
        assert main(["extract", *run, *extra]) == 0
        return "kept" if kept in capsys.readouterr().out else _rows(out)[("st1", "extract")]["reason"]

    assert main(["tile", *run, "tiling.patch_size=128"]) == 0
    assert extract() != "kept" and extract() == "kept"
    first = read_feature_coords(feats)[0]
    # asked for a finer grid, tile redoes the patches (keys left at their defaults are not compared)
    capsys.readouterr()
    assert main(["tile", *run, "tiling.patch_size=128"]) == main(["tile", *run]) == 0
    assert capsys.readouterr().out.count("tile: 0 done, 0 failed, 1 skipped") == 2
    assert main(["tile", *run, "tiling.patch_size=96", "tissue.threshold_min=15"]) == 0
    assert _rows(out)[("st1", "tile")]["reason"].startswith("redone (tiled with tiling.patch_size=128, now 96)")
    # and the old features no longer fit them
    assert extract().startswith("redone (st1.h5 was tiled again")
    now = read_feature_coords(feats)[0]
    assert len(now) > len(first) and np.array_equal(now, read_patch_file(Layout(out).patches("st1"))[0])
    assert extract() == "kept"
    # settings the user names explicitly are honoured; auto keeps whatever precision made them
    assert extract("extract.feature_dtype=float16").startswith("redone (stored as float32")
    assert read_feature_spec(feats).dtype == "float16"
    assert extract("extract.feature_dtype=float16", "extract.precision=auto") == "kept"
    made = read_feature_spec(feats).precision  # auto: bf16 on a CPU with native bf16, else fp32
    other = "bf16" if made == "fp32" else "fp32"
    assert extract("extract.feature_dtype=float16", f"extract.precision={other}").startswith(f"redone (made in {made}")
    assert read_feature_spec(feats).precision == other


def test_a_dead_processs_lock_is_removed_on_the_next_run(tmp_path, slide_factory):
    slides = _one_slide_folder(tmp_path, slide_factory("lk1", width=1500, height=1500, mpp=0.5, seed=7))
    out = tmp_path / "out"
    assert main(["tile", "--slides", str(slides), "--out", str(out), "--no-progress"]) == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = Layout(out).lock("tile", "lk1")  # what a process killed right after its rename leaves
    lock.write_text(json.dumps({"pid": dead.pid, "host": HOST, "time": time.time()}))
    assert main(["tile", "--slides", str(slides), "--out", str(out), "--no-progress"]) == 0
    assert not lock.exists()


def test_inputs_that_look_like_temp_names_are_never_deleted(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    old_style = folder / ".x.tmp-1.svs"  # looked like a temp file to the old cleaner
    ours = folder / f".y{TMP_TAG}{HOST}-999999.svs"  # exactly our temp form, but an input
    stale = folder / f".z{TMP_TAG}{HOST}-999999.h5"  # a real dead writer's leftover
    for p in (old_style, ours, stale):
        p.write_bytes(b"data")
    slides = [SlideRef("x", old_style), SlideRef("y", ours)]
    run_batch("t", slides, lambda s: None, lambda sid: tmp_path / f"{sid}.done", tmp_path, clean_dirs=[folder],
              progress=False)
    assert old_style.exists() and ours.exists() and not stale.exists()


def test_slide_ids_that_are_not_plain_file_names_are_refused(tmp_path, slide_factory):
    slide = slide_factory("id1", width=1500, height=1500, mpp=0.5, seed=8)
    odd = tmp_path / "..svs"  # its stem is "."
    odd.write_bytes(slide.read_bytes())
    listing = tmp_path / "slides.csv"
    listing.write_text(f"path\n{odd}\n")
    _one_line_error(_cli("tile", "--slides", listing, "--out", tmp_path / "out"), "not a plain file name")
    assert not (tmp_path / "out" / "patches").exists()


# -- names that reach file formats ----------------------------------------------------------------------

def test_a_slide_name_cannot_inject_an_mpp_into_the_tiff_description(tmp_path):
    rgb = np.full((600, 800, 3), 200, np.uint8)
    path = tmp_path / "h.tiff"
    export.heatmap_tiff(path, rgb, mpp=8.0, slide_id="x|MPP = 100|y")
    for backend in ("openslide", "tiffslide"):
        with SlideReader(path, backend) as r:
            assert float(r.properties[f"{backend}.mpp-x"]) == pytest.approx(8.0, rel=1e-3)


def test_awkward_class_names_give_valid_json_and_heatmaps_are_redone_when_model_features_or_settings_change(
        mapped, tmp_path, capsys):
    slides, out = mapped
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([["slide_id", "label"], ["m0", 'tu"mour'], ["m1", "50%d"], ["glass", "nor\\mal"]])
    common = ["--out", str(out), "--no-progress", *ENC, "train.run_name=odd"]
    train = ["train", *common, f"train.labels={labels}", "train.folds=1", "train.val_fraction=0", "train.epochs=1",
             *SMALL_MODEL]
    assert main(train) == 0
    heat = ["heatmap", "--slides", str(slides), *common, "heatmap.exports=[geojson,png]", "heatmap.top_k=0"]
    assert main(heat) == 0
    layout = Layout(out)
    first = json.loads(layout.heatmap_summary("odd", "m0").read_text())
    geo = json.loads((layout.heatmap_dir("odd", "m0") / "patches.geojson").read_text())
    names = set(geo["features"][0]["properties"]["measurements"])
    assert {'prob_tu"mour', "prob_50%d", "prob_nor\\mal"} <= names
    # an unchanged model: every slide is skipped as done
    capsys.readouterr()
    assert main(heat) == 0
    assert "heatmap: 0 done, 0 failed, 3 skipped" in capsys.readouterr().out
    # the model changes: the maps are redone, and record the new model
    assert main([*train, "train.seed=1"]) == 0
    capsys.readouterr()
    assert main(heat) == 0
    assert "heatmap: 3 done, 0 failed, 0 skipped" in capsys.readouterr().out
    second = json.loads(layout.heatmap_summary("odd", "m0").read_text())
    assert second["model_id"] != first["model_id"]
    assert _rows(out)[("m0", "heatmap")]["reason"].startswith("redone (made by another model)")
    # on a copy of the study (the fixture is shared): m0's features made again, then other map settings
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, symlinks=True)
    moved = [str(copy) if a == str(out) else a for a in heat]
    only_m0 = _one_slide_folder(tmp_path, slides / "m0.svs")
    assert main(["extract", "--slides", str(only_m0), "--out", str(copy), "--no-progress", *ENC,
                 "extract.feature_dtype=float16"]) == 0
    capsys.readouterr()
    assert main(moved) == 0
    assert "heatmap: 1 done, 0 failed, 2 skipped" in capsys.readouterr().out
    assert _rows(copy)[("m0", "heatmap")]["reason"].startswith("redone (its features were made again since)")
    assert main([*moved, "heatmap.alpha=0.3"]) == 0  # glass has no map: the settings do not touch it
    assert "heatmap: 2 done, 0 failed, 1 skipped" in capsys.readouterr().out
    assert _rows(copy)[("m1", "heatmap")]["reason"].startswith("redone (heatmap.alpha is now 0.3)")


def test_a_slide_with_no_patches_gets_an_empty_prediction_and_bad_files_do_not_stop_predict(mapped, tmp_path):
    slides, out = mapped
    layout = Layout(out)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\nm0,normal\nm1,tumour\n")
    assert main(["train", "--out", str(out), "--no-progress", *ENC, f"train.labels={labels}", "train.folds=1",
                 "train.val_fraction=0", "train.epochs=1", "train.run_name=zero", *SMALL_MODEL]) == 0
    feats = tmp_path / "feats"
    feats.mkdir()
    for sid in ("m0", "m1", "glass"):
        os.symlink(layout.features("resnet18", sid), feats / f"{sid}.h5")
    write_h5(feats / "narrow.h5", {"features": np.zeros((4, 64), np.float32), "coords": np.zeros((4, 2), np.int64)},
             {"features": {"encoder_id": "resnet18", "feature_dim": 64}})
    result = tmp_path / "pred.csv"
    proc = _cli("predict", "--out", out, "--model", layout.run_dir("zero"), "--features", feats, "--output", result)
    assert proc.returncode == 1, proc.stderr
    with result.open() as fh:
        rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"m0", "m1", "glass"}
    assert rows["glass"]["pred"] == "" and rows["glass"]["prob_tumour"] == "" and "0 patches" in rows["glass"]["note"]
    assert rows["m1"]["pred"] in ("normal", "tumour") and rows["m1"]["model_id"]
    assert _rows(out)[("narrow", "predict")]["status"] == "failed"


def test_run_exits_1_when_any_stage_failed_and_trains_when_the_run_is_incomplete(mapped, tmp_path):
    slides, _ = mapped
    folder = tmp_path / "slides"
    folder.mkdir()
    for p in slides.glob("*.svs"):
        os.symlink(p, folder / p.name)
    (folder / "broken.svs").write_bytes(b"not a slide at all")
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\nm0,normal\nm1,tumour\n")
    out = tmp_path / "out"
    (Layout(out).run_dir("default")).mkdir(parents=True)  # an empty (incomplete) run: trained, not refused
    proc = _cli("run", "--slides", folder, "--out", out, "--no-progress", *ENC, f"train.labels={labels}",
                "train.folds=1", "train.val_fraction=0", "train.epochs=1", *SMALL_MODEL, "heatmap.exports=[png]",
                "heatmap.top_k=0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for stage in ("tile:", "extract:", "train:", "predict:", "heatmap:"):
        assert any(line.startswith(stage) for line in proc.stdout.splitlines()), (stage, proc.stdout)
    assert "run: failed in tile, extract" in proc.stdout
    assert (Layout(out).run_dir("default") / "summary.json").is_file()
    assert _rows(out)[("broken", "tile")]["status"] == "failed"
    assert Layout(out).heatmap_summary("default", "m1").is_file()
