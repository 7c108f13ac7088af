"""``wsi-mil serve`` against a real uvicorn on 127.0.0.1 and a real HTTP client: jobs give the predictions
``wsi-mil run`` gives, the gates (401, 403, 413, 429) hold, a kill -9 mid-job resumes on restart, and 50
polling clients see no 5xx while jobs run."""

import concurrent.futures as cf
import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import SMALL_ENCODER
from helpers import spawned_workers

from wsi_mil.cli import main

HEAT = ["heatmap.exports=[png]", "heatmap.top_k=0"]


@pytest.fixture(scope="module")
def served(mapped, tmp_path_factory):
    """A trained run on the mapped study, and what ``wsi-mil run`` predicts for its slides."""
    slides, out = mapped
    root = tmp_path_factory.mktemp("served")
    labels = root / "labels.csv"
    labels.write_text("slide_id,label\nm0,normal\nm1,tumour\n")
    assert main(["train", "--out", str(out), "--no-progress", *SMALL_ENCODER, f"train.labels={labels}",
                 "train.folds=1", "train.val_fraction=0", "train.epochs=2", "train.run_name=svc",
                 "model.hidden_dim=16", "model.attention_dim=8"]) == 0
    model = out / "models" / "svc"
    ref = root / "ref"
    assert main(["run", "--slides", str(slides), "--out", str(ref), "--model", str(model), "--no-progress",
                 *SMALL_ENCODER, *HEAT]) == 0
    rows = {r["slide_id"]: r for r in csv.DictReader((ref / "predictions" / "svc.csv").open())}
    return slides, model, rows


class Server:
    def __init__(self, out: Path, model: Path, root: Path, *extra, env=None):
        self.cmd = [sys.executable, "-m", "wsi_mil.cli", "serve", "--out", str(out), "--model", str(model),
                    "--port", "0", "--slides-root", str(root), *SMALL_ENCODER, *HEAT, *extra]
        self.env = {**os.environ, **(env or {})}
        self.start()

    def start(self):
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=self.env, start_new_session=True)
        line = self.proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line + self.proc.stderr.read()
        self.url = f"http://127.0.0.1:{match.group(1)}"

    def kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def server(served, tmp_path):
    slides, model, _ = served
    made = []

    def start(*extra, out=None, env=None):
        made.append(Server(out or tmp_path / "svc", model, slides, *extra, env=env))
        return made[-1]

    yield start
    for s in made:
        s.stop()


def wait_done(client: httpx.Client, job: str, timeout: float = 300, headers: dict | None = None) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        body = client.get(f"/v1/jobs/{job}", headers=headers).json()
        if body["status"] not in ("queued", "running"):
            return body
        time.sleep(0.2)
    raise AssertionError(f"job {job} not finished: {body}")


def test_five_concurrent_jobs_predict_what_wsi_mil_run_predicts_and_fifty_pollers_get_no_5xx(served, server):
    slides, _, ref = served
    srv = server()
    paths = [str(slides / f"{sid}.svs") for sid in ("m0", "m1", "glass")]
    jobs = [paths, paths[:1], paths[1:], [paths[2], paths[0]], paths[1:2]]
    with httpx.Client(base_url=srv.url, timeout=60) as client, cf.ThreadPoolExecutor(5) as pool:
        ids = list(pool.map(lambda s: client.post("/v1/jobs", json={"slides": s}), jobs))
        assert [r.status_code for r in ids] == [202] * 5
        last = ids[-1].json()["id"]  # queued behind the others: 50 clients poll it while they run

        def poll(_):
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                return [c.get(f"/v1/jobs/{last}").status_code for _ in range(10)]

        with cf.ThreadPoolExecutor(50) as pollers:
            codes = [c for batch in pollers.map(poll, range(50)) for c in batch]
        assert len(codes) == 500 and set(codes) == {200}
        results = [wait_done(client, r.json()["id"]) for r in ids]
        listed = client.get("/v1/jobs").json()["jobs"]
        assert {j["id"] for j in listed} == {r.json()["id"] for r in ids}
        for body, sent in zip(results, jobs):
            assert body["status"] == "done", body
            assert [s["slide_id"] for s in body["slides"]] == [Path(p).stem for p in sent]
            for s in body["slides"]:
                want = ref[s["slide_id"]]
                for key, value in s["prediction"].items():
                    assert str(value) == want[key] or (value in (None, "") and want[key] == ""), (key, value, want)
        heat = next(s for s in results[0]["slides"] if s["heatmap"])
        png = client.get(heat["heatmap"])
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert client.get("/docs").status_code == 200 and "/v1/jobs" in client.get("/openapi.json").text


def test_the_gates_401_403_413_429_and_no_traversal(served, server, tmp_path):
    slides, _, _ = served
    srv = server("--max-queue", "1", "--max-upload-mb", "0.05", env={"WSI_MIL_TOKEN": "s3cret"})
    auth = {"Authorization": "Bearer s3cret"}
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        assert client.get("/v1/jobs").status_code == 401
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
        outside = tmp_path / "elsewhere.svs"
        outside.write_bytes(b"x")
        for path in (str(outside), f"{slides}/../{outside.parent.name}/{outside.name}", "/etc/passwd"):
            r = client.post("/v1/jobs", json={"slides": [path]}, headers=auth)
            assert r.status_code == 403, (path, r.text)
        big = client.post("/v1/jobs", files={"slides": ("big.svs", b"\0" * 100_000)}, headers=auth)
        assert big.status_code == 413
        assert not list((tmp_path / "svc" / "service").glob("uploads/*/big.svs"))
        bad = client.post("/v1/jobs", files={"slides": ("../../evil.svs", b"\0" * 10)}, headers=auth)
        assert bad.status_code in (202, 400)  # reduced to its base name, never written outside uploads/
        assert not (tmp_path / "evil.svs").exists() and not (tmp_path / "svc" / "evil.svs").exists()
        first = client.post("/v1/jobs", json={"slides": [str(slides / "m0.svs"), str(slides / "m1.svs")]}, headers=auth)
        if bad.status_code == 202:  # the queue holds one open job: the bad upload's (it fails, then frees it)
            wait_done(client, bad.json()["id"], headers=auth)
            first = client.post("/v1/jobs", json={"slides": [str(slides / "m0.svs")]}, headers=auth)
        assert first.status_code == 202
        assert client.post("/v1/jobs", json={"slides": [str(slides / "m1.svs")]}, headers=auth).status_code == 429
        assert client.get("/v1/jobs/0123", headers=auth).status_code == 404
        assert client.get("/v1/jobs/../../etc/passwd", headers=auth).status_code == 404
        assert client.get("/v1/jobs", headers={**auth, "Host": "evil.example"}).status_code == 403


def test_a_kill_9_mid_job_then_restart_finishes_every_slide_once(served, server, tmp_path):
    slides, _, ref = served
    out = tmp_path / "svc"
    srv = server(out=out)
    paths = [str(slides / f"{sid}.svs") for sid in ("m0", "m1", "glass")]
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        job = client.post("/v1/jobs", json={"slides": paths}).json()["id"]
        deadline = time.time() + 120
        while time.time() < deadline:  # kill once the first slide is done and the second is under way
            states = [s["status"] for s in client.get(f"/v1/jobs/{job}").json()["slides"]]
            if states[:2] == ["done", "running"]:
                break
            time.sleep(0.05)
        assert states[:2] == ["done", "running"], states
    srv.kill()
    srv.start()  # the same command on the same --out: the queue is recovered
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        body = wait_done(client, job)
    assert body["status"] == "done", body
    assert [s["runs"] for s in body["slides"]] == [1, 2, 1]  # only the slide cut off ran again
    rows = list(csv.DictReader((out / "predictions" / "svc.csv").open()))
    assert sorted(r["slide_id"] for r in rows) == ["glass", "m0", "m1"]
    for r in rows:
        assert r["prob_tumour"] == ref[r["slide_id"]]["prob_tumour"]
    assert not [p for p in out.rglob("*") if ".wsi_mil-tmp-" in p.name]


def _worker_of(srv) -> psutil.Process:
    (worker,) = spawned_workers(srv.proc.pid)
    return worker


def test_the_worker_ends_with_the_server_however_the_server_is_stopped(served, server, tmp_path):
    """Only the server's pid is signalled, as ``kill PID`` or a supervisor does (the other tests kill the
    whole process group): idle after SIGTERM, and mid-job after SIGKILL, no worker outlives it."""
    slides, _, _ = served
    srv = server(out=tmp_path / "svc")
    worker = _worker_of(srv)
    os.kill(srv.proc.pid, signal.SIGTERM)
    srv.proc.wait(30)
    worker.wait(15)  # psutil.TimeoutExpired if it lives on
    srv.start()
    worker = _worker_of(srv)
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        job = client.post("/v1/jobs", json={"slides": [str(slides / "m0.svs"), str(slides / "m1.svs")]}).json()["id"]
        deadline = time.time() + 60
        while client.get(f"/v1/jobs/{job}").json()["slides"][0]["status"] != "running" and time.time() < deadline:
            time.sleep(0.05)
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(30)
    worker.wait(15)
    assert not worker.is_running()


def test_uploaded_slides_are_removed_when_their_job_ends_or_is_refused(served, server, tmp_path):
    """Uploads are the service's own copies: done, cancelled while queued, or refused (429), the folder
    goes; the predictions stay in the layout and equal what ``wsi-mil run`` gives."""
    slides, _, ref = served
    srv = server("--max-queue", "2")
    uploads = tmp_path / "svc" / "service" / "uploads"

    def upload(client, sid):
        return client.post("/v1/jobs", files={"slides": (f"{sid}.svs", (slides / f"{sid}.svs").read_bytes())})

    with httpx.Client(base_url=srv.url, timeout=60) as client:
        first = client.post("/v1/jobs", json={"slides": [str(slides / s) for s in ("m0.svs", "m1.svs", "glass.svs")]})
        queued = upload(client, "m1")
        assert first.status_code == queued.status_code == 202
        cancelled = client.delete(f"/v1/jobs/{queued.json()['id']}").json()
        kept = upload(client, "m0")  # the queue (two open jobs) is full again when it is taken
        refused = upload(client, "glass")
        assert refused.status_code == 429 and kept.status_code == 202
        if cancelled["status"] == "cancelled":  # still queued when cancelled: its upload went at once
            assert len(list(uploads.iterdir())) == 1
        body = wait_done(client, kept.json()["id"])
        wait_done(client, first.json()["id"])
        wait_done(client, queued.json()["id"])
    assert body["status"] == "done" and body["slides"][0]["prediction"]["prob_tumour"] == ref["m0"]["prob_tumour"]
    assert uploads.is_dir() and not list(uploads.iterdir())
    assert (slides / "m0.svs").exists() and (slides / "glass.svs").exists()  # slides given by path are never removed
