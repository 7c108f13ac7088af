"""Issue 20: slides on a DICOMweb server, against a real one: Debian's Orthanc with its DICOMweb plugin on
127.0.0.1 (``pipelines/orthanc.py``), holding cmu-1-small-region converted to DICOM WSI at test time. The
tests skip with one line naming the fix where Orthanc, wsidicomizer or ../shared/slides are missing."""

from __future__ import annotations

import csv
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import CMU, SMALL_ENCODER
from test_slide_formats import convert_to_dicom
from test_viewer import local_client

from wsi_mil.cli import main
from wsi_mil.layout import Layout
from wsi_mil.runner.manifest import read_manifest
from wsi_mil.synthetic import SyntheticSpec, write_slide

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # pipelines/: the Orthanc launcher, shared with the bench
from pipelines import orthanc  # noqa: E402

ENV = ("WSI_MIL_DICOMWEB_USER", "WSI_MIL_DICOMWEB_PASSWORD", "WSI_MIL_DICOMWEB_TOKEN", "WSI_MIL_DICOMWEB_TOKEN_FILE")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Orthanc up, the converted series uploaded; yields (server, study uid, series uid, local svs copy)."""
    why = orthanc.missing()
    if why:
        pytest.skip(why)
    if not CMU.is_file():
        pytest.skip("../shared/slides is not present")
    root = tmp_path_factory.mktemp("dicomweb")
    convert_to_dicom(CMU, root / "dicom")
    import pydicom

    ds = pydicom.dcmread(next((root / "dicom").iterdir()), stop_before_pixels=True)
    srv = orthanc.Orthanc(root / "orthanc").start()
    srv.upload(root / "dicom")
    local = root / "local"
    local.mkdir()
    shutil.copy(CMU, local / "cmu.svs")
    yield srv, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), local
    srv.stop()


@pytest.fixture
def credentials(server, monkeypatch):
    for key in ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WSI_MIL_DICOMWEB_USER", server[0].user)
    monkeypatch.setenv("WSI_MIL_DICOMWEB_PASSWORD", server[0].password)
    monkeypatch.setenv("WSI_MIL_DICOMWEB_BACKOFF", "0.05")  # the retries still happen, quickly
    return server[0]


def slide_csv(path: Path, server, ids=("cmu_web",), local: dict | None = None) -> Path:
    srv, study, series, _ = server
    rows = [{"slide_id": sid, "path": "", "dicomweb_url": srv.dicomweb, "study_uid": study, "series_uid": series}
            for sid in ids]
    rows += [{"slide_id": sid, "path": str(p), "dicomweb_url": "", "study_uid": "", "series_uid": ""}
             for sid, p in (local or {}).items()]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _manifest(out: Path, stage: str) -> dict:
    return {r["slide_id"]: r for r in read_manifest(Layout(out).manifest) if r.get("stage") == stage}


def _no_credentials(root: Path, secrets: tuple[str, ...]) -> None:
    for f in root.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert not any(s.encode() in data for s in secrets), f"a credential in {f}"


def test_a_dicomweb_series_gives_the_local_grid_and_features_and_no_credential_is_written(
        server, credentials, tmp_path, capsys):
    slides = slide_csv(tmp_path / "slides.csv", server, local={"cmu": server[3] / "cmu.svs"})
    out = tmp_path / "out"
    for stage in ("tile", "extract"):
        assert main([stage, "--slides", str(slides), "--out", str(out), "--no-progress", *SMALL_ENCODER]) == 0
    layout = Layout(out)
    with h5py.File(layout.patches("cmu")) as a, h5py.File(layout.patches("cmu_web")) as b:
        np.testing.assert_array_equal(a["coords"][:], b["coords"][:])
        assert b["coords"].attrs["backend"] == "dicom" and b["coords"].attrs["slide_mpp"] == pytest.approx(0.499)
    a = h5py.File(layout.features("resnet18", "cmu"))["features"][:].astype(np.float64)
    b = h5py.File(layout.features("resnet18", "cmu_web"))["features"][:].astype(np.float64)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert len(a) > 20 and cosine.min() >= 0.99
    _no_credentials(out, (credentials.password,))
    assert credentials.password not in capsys.readouterr().err


@pytest.mark.parametrize("wrong", ["password", "token"])
def test_a_refused_login_fails_that_slide_with_one_line_naming_no_credential(wrong, server, credentials, tmp_path,
                                                                             monkeypatch, capsys):
    secret = "wrong-secret-5f2c"
    if wrong == "token":  # a bearer token the server does not accept, given in a token file
        monkeypatch.delenv("WSI_MIL_DICOMWEB_USER")
        (tmp_path / "token").write_text(secret)
        monkeypatch.setenv("WSI_MIL_DICOMWEB_TOKEN_FILE", str(tmp_path / "token"))
    else:
        monkeypatch.setenv("WSI_MIL_DICOMWEB_PASSWORD", secret)
    slides = slide_csv(tmp_path / "slides.csv", server, local={"cmu": server[3] / "cmu.svs"})
    out = tmp_path / "out"
    assert main(["tile", "--slides", str(slides), "--out", str(out), "--no-progress"]) == 1
    rows = _manifest(out, "tile")
    assert rows["cmu"]["status"] == "done" and rows["cmu_web"]["status"] == "failed"
    reason = rows["cmu_web"]["reason"]
    assert "401" in reason and "credentials refused" in reason and "\n" not in reason
    printed = capsys.readouterr()
    for value in (secret, credentials.password):
        assert value not in reason and value not in printed.out + printed.err
    _no_credentials(out, (secret, credentials.password))


def test_orthanc_stopped_mid_extract_fails_the_slides_left_and_a_rerun_completes(server, credentials, tmp_path):
    """Two DICOMweb slides extracted one after the other: Orthanc is stopped as soon as the first one's
    features are written, so the second fails (one line, after the retries) and the batch finishes; with
    Orthanc back, the rerun extracts only the failed slide."""
    srv = server[0]
    slides = slide_csv(tmp_path / "slides.csv", server, ids=("web_a", "web_b"))
    out = tmp_path / "out"
    common = ["--slides", str(slides), "--out", str(out), "--no-progress", "runner.workers=1", *SMALL_ENCODER]
    assert main(["tile", *common]) == 0
    first = Layout(out).features("resnet18", "web_a")
    stopped = threading.Event()

    def stop_after_first():
        deadline = time.time() + 120
        while not first.exists() and time.time() < deadline:
            time.sleep(0.005)
        srv.stop()
        stopped.set()

    watcher = threading.Thread(target=stop_after_first)
    watcher.start()
    try:
        code = main(["extract", *common])
    finally:
        watcher.join()
        srv.start()
    rows = _manifest(out, "extract")
    assert stopped.is_set() and code == 1
    assert rows["web_a"]["status"] == "done" and rows["web_b"]["status"] == "failed"
    assert "\n" not in rows["web_b"]["reason"] and srv.password not in rows["web_b"]["reason"]
    before = first.stat().st_mtime_ns
    assert main(["extract", *common]) == 0
    rows = _manifest(out, "extract")
    assert rows["web_b"]["status"] == "done" and first.stat().st_mtime_ns == before  # only the failed one redone
    a = h5py.File(first)["features"][:]
    b = h5py.File(Layout(out).features("resnet18", "web_b"))["features"][:]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_run_and_the_viewer_work_on_a_dicomweb_study(server, credentials, tmp_path):
    """`wsi-mil run` over a CSV mixing a DICOMweb slide with two local ones (training a small model on
    them), then the viewer serving the DICOMweb slide's Deep Zoom tiles, read from the server, equal to the
    same tiles of the local svs."""
    from wsi_mil.viewer.app import create_app
    from wsi_mil.viewer.study import Study

    local = {"syn_a": tmp_path / "syn_a.svs", "syn_b": tmp_path / "syn_b.svs"}
    for i, p in enumerate(local.values()):
        write_slide(p, SyntheticSpec(width=1536, height=1536, mpp=0.5, seed=40 + i, tumour=i == 1))
    slides = slide_csv(tmp_path / "slides.csv", server, local=local)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\ncmu_web,a\nsyn_a,a\nsyn_b,b\n")
    out = tmp_path / "out"
    assert main(["run", "--slides", str(slides), "--out", str(out), "--no-progress", *SMALL_ENCODER,
                 f"train.labels={labels}", "train.folds=1", "train.val_fraction=0", "train.epochs=2",
                 "model.hidden_dim=16", "model.attention_dim=8", "heatmap.exports=[png,geojson]",
                 "heatmap.top_k=1"]) == 0
    layout = Layout(out)
    assert layout.heatmap_summary("default", "cmu_web").is_file()
    web = local_client(create_app(Study(out, slides)))
    rows = {r["slide_id"]: r for r in web.get("/api/study").json()["slides"]}
    assert rows["cmu_web"]["viewable"] and rows["cmu_web"]["has_heatmap"]
    svs_dir = tmp_path / "svs"
    svs_dir.mkdir()
    os.symlink(server[3] / "cmu.svs", svs_dir / "cmu_web.svs")  # the same slide under the same id, locally
    files = local_client(create_app(Study(out, svs_dir)))
    meta = web.get("/api/slides/cmu_web").json()
    assert meta["width"] == 2220 and meta["height"] == 2967
    import cv2

    for level in (meta["levels"] - 1, meta["levels"] - 3):
        a, b = web.get(f"/tiles/cmu_web/slide/{level}/0_0.jpeg"), files.get(f"/tiles/cmu_web/slide/{level}/0_0.jpeg")
        assert a.status_code == b.status_code == 200
        x = cv2.imdecode(np.frombuffer(a.content, np.uint8), cv2.IMREAD_COLOR).astype(int)
        y = cv2.imdecode(np.frombuffer(b.content, np.uint8), cv2.IMREAD_COLOR).astype(int)
        assert x.shape == y.shape and np.abs(x - y).mean() < 2
    assert web.get(f"/tiles/cmu_web/overlay/attention/jet/{meta['levels'] - 1}/0_0.png").status_code == 200
    _serve_the_series_by_reference(server, out, tmp_path)


def _serve_the_series_by_reference(server, out: Path, tmp_path: Path) -> None:
    """``wsi-mil serve`` takes the same series by reference, from an allowed DICOMweb root only, and
    predicts what ``wsi-mil run`` predicted for it."""
    import re
    import signal
    import subprocess

    import httpx

    srv, study, series, _ = server
    proc = subprocess.Popen([sys.executable, "-m", "wsi_mil.cli", "serve", "--out", str(tmp_path / "svc"), "--model",
                             str(out / "models" / "default"), "--port", "0", "--dicomweb-root", srv.dicomweb,
                             *SMALL_ENCODER, "heatmap.exports=[png]", "heatmap.top_k=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        ref = {"slide_id": "cmu_web", "dicomweb_url": srv.dicomweb, "study_uid": study, "series_uid": series}
        with httpx.Client(base_url=url, timeout=60) as client:
            other = {**ref, "dicomweb_url": "http://169.254.169.254/dicom-web"}  # not an allowed root
            assert client.post("/v1/jobs", json={"slides": [other]}).status_code == 403
            job = client.post("/v1/jobs", json={"slides": [ref]}).json()["id"]
            deadline = time.time() + 300
            while (body := client.get(f"/v1/jobs/{job}").json())["status"] in ("queued", "running"):
                assert time.time() < deadline, body
                time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert body["status"] == "done", body
    want = next(r for r in csv.DictReader((out / "predictions" / "default.csv").open()) if r["slide_id"] == "cmu_web")
    got = body["slides"][0]["prediction"]
    assert got["n_patches"] == int(want["n_patches"])
    for key in ("prob_a", "prob_b", "pred"):
        assert str(got[key]) == want[key], (key, got, want)


def test_transient_server_errors_are_retried_with_backoff_and_credentials_come_from_the_environment(
        tmp_path, monkeypatch):
    """A server answering 503 twice, then 200: the session retries (urllib3, with backoff) and succeeds,
    sending the bearer token read from WSI_MIL_DICOMWEB_TOKEN_FILE; with more failures than retries the
    last answer comes back (the caller turns it into one line)."""
    import http.server

    from wsi_mil.slide import dicomweb

    seen: list[str | None] = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the handler's name is http.server's)
            seen.append(self.headers.get("Authorization"))
            code = 503 if len(seen) % 3 else 200
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        for key in ENV:
            monkeypatch.delenv(key, raising=False)
        (tmp_path / "token").write_text("tok-123\n")
        monkeypatch.setenv("WSI_MIL_DICOMWEB_TOKEN_FILE", str(tmp_path / "token"))
        monkeypatch.setenv("WSI_MIL_DICOMWEB_BACKOFF", "0.01")
        url = f"http://127.0.0.1:{httpd.server_address[1]}/x"
        assert dicomweb.session().get(url, timeout=5).status_code == 200
        assert len(seen) == 3 and set(seen) == {"Bearer tok-123"}
        monkeypatch.setenv("WSI_MIL_DICOMWEB_RETRIES", "1")
        seen.clear()
        assert dicomweb.session().get(url, timeout=5).status_code == 503 and len(seen) == 2
    finally:
        httpd.shutdown()


def test_a_dicomweb_row_without_an_http_address_or_an_id_is_one_line_naming_it(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    for text, expected in (("slide_id,dicomweb_url,study_uid,series_uid\nx,notaurl,1,2\n", "line 2: dicomweb_url"),
                           ("slide_id,dicomweb_url,study_uid,series_uid\n,http://h/dicom-web,1,2\n", "needs its slide_id"),
                           ("slide_id,dicomweb_url,study_uid,series_uid\nx,http://h/dicom-web,,2\n", "empty study_uid")):
        bad.write_text(text)
        assert main(["tile", "--slides", str(bad), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0] and err[0].startswith("error:"), err
