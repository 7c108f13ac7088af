import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BROKEN
from helpers import assert_same_outputs, spawned_workers, temp_files

from wsi_mil.atomic import HOST, TMP_TAG, atomic_path, clean_stale_temps
from wsi_mil.cli import main
from wsi_mil.runner import SlideLock, read_manifest, run_batch
from wsi_mil.slide import SlideRef


def _rows(out: Path) -> dict:
    return {r["slide_id"]: r for r in read_manifest(out / "manifest.csv")}


def test_failed_slide_is_recorded_and_the_batch_goes_on(cohort, tmp_path, capsys):
    slides = tmp_path / "slides"
    shutil.copytree(cohort / "slides", slides)
    (slides / "zero.svs").write_bytes(b"")
    (slides / "text.tif").write_text("this is not a slide\n")
    if BROKEN.is_file():
        shutil.copy(BROKEN, slides / "broken.svs")
    out = tmp_path / "out"
    rc = main(["tile", "--slides", str(slides), "--out", str(out), "--no-progress"])
    assert rc == 1
    rows = _rows(out)
    bad = {"zero", "text"} | ({"broken"} if BROKEN.is_file() else set())
    for sid in bad:
        assert rows[sid]["status"] == "failed" and rows[sid]["reason"]
        assert "\n" not in rows[sid]["reason"]
        assert not (out / "patches" / f"{sid}.h5").exists()
    good = set(rows) - bad
    assert len(good) == 6 and all(rows[s]["status"] == "done" for s in good)
    assert all((out / "patches" / f"{s}.h5").is_file() for s in good)
    summary = capsys.readouterr().out
    assert "6 done, " in summary and f"{len(bad)} failed" in summary


def test_resume_skips_complete_outputs_and_overwrite_redoes_them(cohort, tmp_path):
    out = tmp_path / "out"
    args = ["tile", "--slides", str(cohort / "slides"), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    first = (out / "patches" / "syn_000.h5").stat().st_mtime_ns
    (out / "patches" / "syn_001.h5").unlink()
    assert main(args) == 0
    rows = _rows(out)
    assert rows["syn_000"]["status"] == "done"  # a skip never hides an earlier "done"
    assert (out / "patches" / "syn_001.h5").is_file()
    assert (out / "patches" / "syn_000.h5").stat().st_mtime_ns == first
    assert main([*args, "--overwrite"]) == 0
    assert (out / "patches" / "syn_000.h5").stat().st_mtime_ns != first


def test_process_pool_gives_the_same_outputs_as_serial(cohort, tmp_path):
    a, b = tmp_path / "serial", tmp_path / "pool"
    assert main(["tile", "--slides", str(cohort / "slides"), "--out", str(a), "--no-progress"]) == 0
    assert main(["tile", "--slides", str(cohort / "slides"), "--out", str(b), "--no-progress",
                 "--executor", "process", "--workers", "2"]) == 0
    assert_same_outputs(a, b)


def test_atomic_path_never_leaves_a_partial_file(tmp_path):
    final = tmp_path / "x.h5"
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert not final.exists() and not list(tmp_path.iterdir())


def test_stale_temp_of_a_dead_writer_is_removed_but_a_live_one_is_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".a{TMP_TAG}{HOST}-{dead.pid}.h5"
    live = tmp_path / f".b{TMP_TAG}{HOST}-{os.getpid()}.h5"
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    assert clean_stale_temps(tmp_path) == 1
    assert not stale.exists() and live.exists()


def test_lock_is_exclusive_and_a_dead_holders_lock_is_reclaimed(tmp_path):
    path = tmp_path / "s.lock"
    a = SlideLock(path)
    assert a.acquire()
    assert a.holder()["pid"] == os.getpid() and a.holder()["host"] == HOST and a.holder()["time"] > 0
    code = f"from wsi_mil.runner import SlideLock; import sys; sys.exit(0 if SlideLock({str(path)!r}).acquire() else 3)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 3  # held by us
    a.release()
    # a process that takes the lock and dies without releasing it
    subprocess.run([sys.executable, "-c", code.replace("sys.exit(0 if", "import os; os._exit(0 if")])
    assert path.exists()  # its lock file is left behind...
    b = SlideLock(path)
    assert b.acquire()  # ...and reclaimed
    b.release()


def test_locked_slide_is_skipped_not_run_twice(tmp_path):
    ran = []
    lock = SlideLock(tmp_path / ".locks" / "demo" / "s1.lock")
    assert lock.acquire()
    res = run_batch("demo", [SlideRef("s1", tmp_path), SlideRef("s2", tmp_path)],
                    lambda s: ran.append(s.slide_id), lambda sid: tmp_path / f"{sid}.out", tmp_path,
                    progress=False)
    lock.release()
    assert ran == ["s2"]
    assert [r.status for r in res.records] == ["skipped", "done"]
    assert "locked by pid" in res.records[0].reason


@pytest.fixture(scope="module")
def kill_slides(slide_folder):
    return slide_folder("k", 8, 100, width=6144, height=5120, mpp=0.25)


def _tile_cmd(slides: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "wsi_mil.cli", "tile", "--slides", str(slides), "--out", str(out),
            "--no-progress"]


def test_sigkill_mid_batch_then_resume_equals_an_uninterrupted_run(kill_slides, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert subprocess.run(_tile_cmd(kill_slides, ref), capture_output=True).returncode == 0
    proc = subprocess.Popen(_tile_cmd(kill_slides, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "patches").glob("*.h5"))) < 2 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list((out / "patches").glob("*.h5")))
    assert 0 < done_at_kill < 8, "the kill should land mid-batch"
    assert subprocess.run(_tile_cmd(kill_slides, out), capture_output=True).returncode == 0
    assert temp_files(out) == []
    assert_same_outputs(ref, out)
    rows = _rows(out)
    assert len(rows) == 8 and all(r["status"] == "done" for r in rows.values())


def test_cli_user_errors_are_one_line(tmp_path):
    for argv, needle in [
        (["tile", "--slides", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "no such folder"),
        (["tile", "--slides", str(tmp_path), "--out", str(tmp_path / "o"), "tiling.patch_sise=3"], "unknown key"),
        (["tile", "--slides", str(tmp_path), "--out", str(tmp_path / "o")], "no slides found"),
    ]:
        r = subprocess.run([sys.executable, "-m", "wsi_mil.cli", *argv], capture_output=True, text=True)
        assert r.returncode == 2
        assert r.stderr.count("\n") == 1 and needle in r.stderr and "Traceback" not in r.stderr



def test_output_finished_just_before_a_crash_is_recorded_done(tmp_path):
    """The window between the atomic rename and the manifest update: the resume must call it done."""
    (tmp_path / "s1.out").write_text("complete")
    ran = []
    res = run_batch("demo", [SlideRef("s1", tmp_path), SlideRef("s2", tmp_path)],
                    lambda s: ran.append(s.slide_id), lambda sid: tmp_path / f"{sid}.out", tmp_path,
                    progress=False)
    assert ran == ["s2"] and res.records[0].status == "skipped"
    assert {r["slide_id"]: r["status"] for r in read_manifest(tmp_path / "manifest.csv")} == {
        "s1": "done", "s2": "done"}


def _visible_gpu(_item):
    time.sleep(0.2)  # keep both workers busy so each takes some items
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_one_process_per_gpu_each_pinned_to_its_own_device():
    from wsi_mil.runner import ProcessExecutor

    ex = ProcessExecutor(0, gpus=[0, 1])
    seen = [r for _, r in ex.imap(_visible_gpu, list(range(6)), lambda i, why: None)]
    assert ex.workers == 2 and sorted(set(seen)) == ["0", "1"]


POOL_BATCH = """
import signal, time
from wsi_mil.runner import ProcessExecutor
# as from a terminal: a suite started in the background (nohup, `cmd &`) hands its children SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
for _ in ProcessExecutor(2, retries=0).imap(time.sleep, [600] * 4, lambda item, why: None):
    pass
"""


def _pool_batch():
    batch = subprocess.Popen([sys.executable, "-c", POOL_BATCH], start_new_session=True, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 60, []
    while len(workers) < 2 and time.time() < deadline:
        time.sleep(0.2)
        workers = spawned_workers(batch.pid)
    assert len(workers) == 2
    return batch, workers


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL", "Ctrl-C", "SIGINT to the batch alone"])
def test_a_process_pools_workers_end_with_the_batch_that_started_them(how):
    """``kill PID`` on a batch (not its process group): its pool workers must not finish the slides already
    handed to them and then wait for ever (each would hold a model, and a GPU's memory). Ctrl-C (the whole
    process group) or SIGINT stops the batch at once, not after every slide it had submitted (600 s each)."""
    import psutil

    batch, workers = _pool_batch()
    try:
        if how == "Ctrl-C":
            os.killpg(batch.pid, signal.SIGINT)
        else:
            os.kill(batch.pid, {"SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}.get(how, signal.SIGINT))
        batch.wait(60)
        gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive and len(gone) == 2
    finally:
        try:  # the batch's session: whatever of it is left, if the test failed
            os.killpg(batch.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
