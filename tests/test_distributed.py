"""Batch at scale: Dask executor, concurrent runs with locks, fault injection (SIGKILL, dying workers,
corrupt inputs)."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_same_outputs, temp_files

from wsi_mil.cli import main
from wsi_mil.layout import Layout
from wsi_mil.runner import read_manifest, run_batch
from wsi_mil.slide import SlideRef
from wsi_mil.synthetic import SyntheticSpec, write_slide
from wsi_mil.testing import FaultyTask

pytest.importorskip("dask.distributed")
EXTRACT = ["encoder.name=resnet18", "encoder.pretrained=false", "extract.num_workers=0", "extract.batch_size=16"]


def _status(out: Path) -> dict:
    return {(r["slide_id"], r["stage"]): r for r in read_manifest(out / "manifest.csv")}


def test_tile_and_extract_on_a_local_dask_cluster_equal_serial(cohort, tmp_path):
    serial, dask = tmp_path / "serial", tmp_path / "dask"
    slides = ["--slides", str(cohort / "slides"), "--no-progress"]
    for out, extra in ((serial, []), (dask, ["--executor", "dask", "--workers", "2"])):
        assert main(["tile", *slides, "--out", str(out), *extra]) == 0
        assert main(["extract", *slides, "--out", str(out), *extra, *EXTRACT]) == 0
    assert_same_outputs(serial, dask)
    rows = _status(dask)
    assert len(rows) == 12 and all(r["status"] == "done" for r in rows.values())


def test_a_worker_that_dies_mid_slide_is_retried_elsewhere_or_recorded(tmp_path):
    from wsi_mil.runner.dask_executor import DaskExecutor

    fn = FaultyTask(tmp_path, die_once={"s1"}, die_always={"s3"})
    slides = [SlideRef(f"s{i}", tmp_path) for i in range(5)]
    res = run_batch("faulty", slides, fn, fn.output, tmp_path, DaskExecutor(workers=2, retries=2), progress=False)
    status = {r.slide_id: r for r in res.records}
    assert status["s3"].status == "failed" and "worker failed" in status["s3"].reason
    manifest = {r["slide_id"]: r["status"] for r in read_manifest(tmp_path / "manifest.csv")}
    # s1 was killed once, rescheduled on another worker and finished; the innocent slides all finished
    assert manifest == {"s0": "done", "s1": "done", "s2": "done", "s3": "failed", "s4": "done"}
    assert (tmp_path / ".s1.died").exists() and fn.output("s1").read_text() == "s1\n"


_CONCURRENT = """
import sys
from pathlib import Path
from wsi_mil.runner import run_batch
from wsi_mil.slide import SlideRef
from wsi_mil.testing import FaultyTask
out = Path(sys.argv[1])
fn = FaultyTask(out, log=out / "starts.log", sleep=0.3)
run_batch("conc", [SlideRef(f"s{i}", out) for i in range(12)], fn, fn.output, out, progress=False)
"""


def test_two_runs_at_once_process_each_slide_exactly_once(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(tmp_path)]) for _ in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    starts = (tmp_path / "starts.log").read_text().split()
    slides = starts[0::2]
    assert sorted(slides) == sorted(f"s{i}" for i in range(12))  # every slide, once
    assert len(set(starts[1::2])) == 2  # both runs did work
    assert all(r["status"] == "done" for r in read_manifest(tmp_path / "manifest.csv"))


def _cli(stage: str, slides: Path, out: Path, extra=()) -> list[str]:
    return [sys.executable, "-m", "wsi_mil.cli", stage, "--slides", str(slides), "--out", str(out), "--no-progress",
            *extra]


@pytest.fixture(scope="module")
def fault_slides(slide_folder):
    return slide_folder("f", 6, 200, width=3072, height=2048, mpp=0.5)


@pytest.mark.parametrize("stage, seed", [("tile", 1), ("extract", 2)])
def test_random_sigkills_then_resume_equal_an_uninterrupted_run(fault_slides, tmp_path, stage, seed):
    extra = EXTRACT if stage == "extract" else []
    ref, out = tmp_path / "ref", tmp_path / "killed"
    for o in (ref, out):
        if stage == "extract":
            assert subprocess.run(_cli("tile", fault_slides, o), capture_output=True).returncode == 0
    assert subprocess.run(_cli(stage, fault_slides, ref, extra), capture_output=True).returncode == 0
    layout = Layout(out)
    done = (lambda: list(layout.patches_dir.glob("*.h5"))) if stage == "tile" else (
        lambda: list(layout.features_dir("resnet18").glob("*.h5")))
    rng = np.random.default_rng(seed)
    kills = 0
    for _ in range(3):
        before = len(done())
        proc = subprocess.Popen(_cli(stage, fault_slides, out, extra), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        # kill mid-batch, whatever the machine's speed: once this run has finished a slide, at a random moment
        deadline = time.time() + 300
        while proc.poll() is None and len(done()) <= before and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.15))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the batch and its DataLoader workers, no cleanup
            kills += 1
        proc.wait()
    assert kills >= 1
    assert subprocess.run(_cli(stage, fault_slides, out, extra), capture_output=True).returncode == 0
    assert temp_files(out) == []
    assert_same_outputs(ref, out)
    rows = _status(out)
    assert {sid for sid, st in rows if st == stage} == {f"f{i}" for i in range(6)}
    assert all(r["status"] == "done" for (sid, st), r in rows.items() if st == stage)


def test_corrupt_inputs_are_recorded_and_the_rest_complete(cohort, tmp_path):
    slides = tmp_path / "slides"
    shutil.copytree(cohort / "slides", slides)
    (slides / "zero.svs").write_bytes(b"")
    good = next(iter(sorted(slides.glob("syn_*.svs"))))
    data = good.read_bytes()
    (slides / "truncated.svs").write_bytes(data[: len(data) // 3])
    (slides / "notes.tiff").write_text("lab notes, not a slide\n")
    write_slide(slides / "glass.svs", SyntheticSpec(width=2048, height=2048, mpp=0.5, blank=True))
    out = tmp_path / "out"
    assert main(["tile", "--slides", str(slides), "--out", str(out), "--no-progress"]) == 1
    assert main(["extract", "--slides", str(slides), "--out", str(out), "--no-progress", *EXTRACT]) == 1
    rows = _status(out)
    for sid in ("zero", "truncated", "notes"):
        r = rows[(sid, "tile")]
        assert r["status"] == "failed" and r["reason"] and "\n" not in r["reason"], sid
    assert rows[("glass", "tile")]["reason"] == "no tissue found: 0 patches"
    assert rows[("glass", "extract")]["reason"] == "0 patches: empty bag written"
    # and a model applied to the batch maps the slides with tissue and notes the empty one
    from wsi_mil.mil.checkpoint import CheckpointMeta, save_checkpoint
    from wsi_mil.mil.ensemble import write_run_summary
    from wsi_mil.mil.models import create_model

    save_checkpoint(out / "models" / "default" / "fold_0.safetensors", create_model("abmil_gated", 512, 2),
                    CheckpointMeta({"name": "abmil_gated", "hidden_dim": 256, "attention_dim": 128, "dropout": 0.25},
                                   {"normal": 0, "tumour": 1}, 512, "resnet18"))
    write_run_summary(out / "models" / "default", {"fold_files": ["fold_0.safetensors"]})
    assert main(["heatmap", "--slides", str(slides), "--out", str(out), "--no-progress", *EXTRACT,
                 "heatmap.exports=[png]", "heatmap.top_k=0"]) == 1
    rows = _status(out)
    assert rows[("glass", "heatmap")]["status"] == "done"
    assert rows[("glass", "heatmap")]["reason"] == "0 patches: nothing to map"
    assert rows[("zero", "heatmap")]["status"] == "failed"
    for p in cohort.glob("slides/*.svs"):
        assert rows[(p.stem, "tile")]["status"] == "done" and rows[(p.stem, "extract")]["status"] == "done"
    with (out / "manifest.csv").open() as fh:
        assert list(csv.DictReader(fh))[0].keys() == {"slide_id", "stage", "status", "seconds", "reason"}
