"""`wsi-mil view`: the study API, tiles, safety (traversal, token, escaping, read-only) over HTTP, and the
pages in a real headless Chromium (Debian's package, driven by Playwright; skipped with a message where
it is not installed: `make test` installs it when it can).

The browser study is made of the demo's own synthetic slides (``make_cohort``), tiled by the real tile
stage. Its heatmaps are written in the heatmap stage's format with scores taken from the ground truth
(each patch's tumour fraction plus a little noise), so that what is measured on the screenshots is the
viewer's rendering and alignment, not a model's accuracy. One test serves a study made by every real
stage (train + heatmap) to check the viewer reads their outputs as written.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from conftest import SMALL_ENCODER
from starlette.testclient import TestClient

from wsi_mil.atomic import write_csv
from wsi_mil.cli import main
from wsi_mil.h5io import read_coords, write_h5
from wsi_mil.heatmap.scores import percentile_rank, softmax, tumour_fraction
from wsi_mil.layout import Layout
from wsi_mil.runner.manifest import Record, update_manifest
from wsi_mil.slide import open_slide
from wsi_mil.synthetic import SyntheticSpec, load_truth, make_cohort, write_slide
from wsi_mil.viewer import app as viewer_app
from wsi_mil.viewer.app import create_app
from wsi_mil.viewer.serve import token_for, view_url
from wsi_mil.viewer.study import Study
from wsi_mil.viewer.tiles import TILE, lut

XSS_ID = "<img src=x onerror=alert(1)>\"'&"
XSS_TEXT = "<script>alert(1)</script>\"'&"
SHOTS = Path(os.environ.get("WSI_MIL_SCREENSHOTS", Path(__file__).resolve().parents[1] / "build" / "screenshots"))


def local_client(app) -> TestClient:
    """A client whose requests carry ``Host: 127.0.0.1`` (TestClient's default ``testserver`` is refused)."""
    return TestClient(app, base_url="http://127.0.0.1")


def write_truth_heatmap(layout: Layout, run: str, slide_id: str, truth_dir: Path, seed: int = 0) -> np.ndarray:
    """scores.h5 + summary.json in the heatmap stage's format, scores = tumour fraction + noise."""
    coords, attrs = read_coords(layout.patches(slide_id))
    rng = np.random.default_rng(seed)
    try:
        mask, mask_mpp = load_truth(truth_dir, slide_id, "tumour")
        frac = tumour_fraction(coords, float(attrs["patch_size_level0"]), mask, mask_mpp / float(attrs["slide_mpp"]))
    except FileNotFoundError:
        frac = np.zeros(len(coords))
    logits = (frac + 0.01 * rng.random(len(coords))).astype(np.float32)
    pct = percentile_rank(logits)
    folder = layout.heatmap_dir(run, slide_id)
    write_h5(folder / "scores.h5", {"coords": coords, "attention_logits": logits, "attention": softmax(logits),
                                    "attention_percentile": pct.astype(np.float32)},
             {"coords": attrs, "/": {"slide_id": slide_id, "run": run, "classes": '["normal", "tumour"]',
                                     "mapped_class": "tumour"}})
    p = float(frac.max()) if len(frac) else 0.0
    (folder / "summary.json").write_text(json.dumps({
        "slide_id": slide_id, "run": run, "prediction": "tumour" if p > 0.5 else "normal",
        "probabilities": {"normal": 1 - p, "tumour": p}, "n_patches": int(len(coords)), "heatmap": {"top_k": 4}}))
    (folder / "patches.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    return pct


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """Four demo slides (two with tumour) and one named like an XSS payload, tiled; truth heatmaps."""
    root = make_cohort(tmp_path_factory.mktemp("viewer"), n_slides=4, width=3072, height=2560, pen_every=0)
    write_slide(root / "slides" / f"{XSS_ID}.svs", SyntheticSpec(width=1536, height=1536, seed=7))
    out = root / "out"
    assert main(["tile", "--slides", str(root / "slides"), "--out", str(out), "--no-progress"]) == 0
    layout = Layout(out)
    ids = sorted(p.stem for p in (root / "slides").glob("*.svs"))
    for i, sid in enumerate(ids):
        write_truth_heatmap(layout, "default", sid, root / "truth", seed=i)
    labels = {r.split(",")[0]: r.split(",")[1] for r in (root / "labels.csv").read_text().splitlines()[1:]}
    write_csv(layout.out_of_fold("default"), [{"slide_id": sid, "label": labels.get(sid, XSS_TEXT)} for sid in ids])
    update_manifest(layout.manifest, [Record(XSS_ID, "extract", "failed", 0.0, f"reason {XSS_TEXT}")])
    return root


@pytest.fixture(scope="module")
def client(study):
    return local_client(create_app(Study(study / "out", study / "slides")))


# -- the study and its tiles ---------------------------------------------------------------------------

def test_study_api_lists_every_slide_with_label_prediction_patches_and_status(study, client):
    rows = {r["slide_id"]: r for r in client.get("/api/study").json()["slides"]}
    assert set(rows) == {p.stem for p in (study / "slides").glob("*.svs")}
    layout = Layout(study / "out")
    for sid, row in rows.items():
        with h5py.File(layout.patches(sid)) as fh:
            assert row["n_patches"] == fh["coords"].shape[0]
        assert row["status"]["tile"] == "done"
        summary = json.loads(layout.heatmap_summary("default", sid).read_text())
        assert row["prediction"] == summary["prediction"]
        assert row["probability"] == pytest.approx(summary["probabilities"][summary["prediction"]])
    assert rows["syn_001"]["label"] == "tumour" and rows["syn_000"]["label"] == "normal"
    assert rows[XSS_ID]["reasons"] == [f"extract: reason {XSS_TEXT}"] and rows[XSS_ID]["status"]["extract"] == "failed"


def test_overlay_tiles_line_up_with_patches_and_are_transparent_off_tissue(study, client):
    sid = "syn_001"
    meta = client.get(f"/api/slides/{sid}").json()
    with h5py.File(Layout(study / "out").heatmap_file("default", sid, "scores.h5")) as fh:
        coords, pct = fh["coords"][:], fh["attention_percentile"][:]
        size = float(fh["coords"].attrs["patch_size_level0"])
    deepest = meta["levels"] - 1
    jet = lut("jet")
    for i in np.random.default_rng(0).choice(len(coords), 6, replace=False):
        cx, cy = (int(v) for v in coords[i] + size / 2)
        res = client.get(f"/tiles/{sid}/overlay/attention/jet/{deepest}/{cx // TILE}_{cy // TILE}.png")
        assert res.status_code == 200 and res.headers["content-type"] == "image/png"
        rgba = cv2.cvtColor(cv2.imdecode(np.frombuffer(res.content, np.uint8), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA)
        px = rgba[cy % TILE, cx % TILE]
        assert px[3] == 255 and np.abs(px[:3].astype(int) - jet[int(pct[i] / 100 * 255), :3]).max() <= 1
    res = client.get(f"/tiles/{sid}/overlay/attention/jet/{deepest}/0_0.png")  # the slide's corner: glass
    corner = cv2.imdecode(np.frombuffer(res.content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert corner.shape[2] == 4 and (corner[..., 3] == 0).all()
    assert client.get(f"/tiles/{sid}/overlay/attention/nocmap/{deepest}/0_0.png").status_code == 404
    assert client.get(f"/tiles/{sid}/overlay/nomap/jet/{deepest}/0_0.png").status_code == 404
    assert client.get(f"/tiles/{sid}/slide/{deepest}/999_999.jpeg").status_code == 404


def test_slide_tiles_are_the_slides_pixels(study, client):
    sid = "syn_003"
    meta = client.get(f"/api/slides/{sid}").json()
    deepest = meta["levels"] - 1
    res = client.get(f"/tiles/{sid}/slide/{deepest}/3_4.jpeg")
    assert res.headers["content-type"] == "image/jpeg"
    tile = cv2.cvtColor(cv2.imdecode(np.frombuffer(res.content, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    with open_slide(study / "slides" / f"{sid}.svs") as reader:
        truth = reader.read_region((3 * TILE, 4 * TILE), 0, (TILE, TILE))
    assert tile.shape == truth.shape and np.abs(tile.astype(int) - truth).mean() < 4  # two JPEG generations
    assert meta["width"] == 3072 and meta["height"] == 2560 and meta["mpp"] == pytest.approx(0.5)


def _trained_study(mapped, tmp_path, labels_csv: str, *train_args) -> tuple[Path, TestClient]:
    """The mapped slides trained on (one split, two epochs) and mapped by the real stages, served."""
    slides, out0 = mapped
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    labels = tmp_path / "labels.csv"
    labels.write_text(labels_csv)
    common = ["--out", str(out), "--no-progress", *SMALL_ENCODER]
    assert main(["train", *common, f"train.labels={labels}", "train.folds=1", "train.val_fraction=0", "train.epochs=2",
                 "model.hidden_dim=16", "model.attention_dim=8", *train_args]) == 0
    assert main(["heatmap", "--slides", str(slides), *common, "heatmap.top_k=1"]) == 0
    return out, local_client(create_app(Study(out, slides)))


def test_a_study_made_by_the_real_stages_is_served_with_one_map_per_class(mapped, tmp_path):
    out, client = _trained_study(mapped, tmp_path, "slide_id,label\nm0,a\nm1,b\nglass,c\n", "model.name=clam_mb")
    rows = {r["slide_id"]: r for r in client.get("/api/study").json()["slides"]}
    assert rows["m1"]["label"] == "b" and rows["m1"]["prediction"] in {"a", "b", "c"}
    assert rows["glass"]["n_patches"] == 0 and not rows["glass"]["has_heatmap"]
    meta = client.get("/api/slides/m1").json()
    assert meta["maps"] == ["a", "b", "c"] and meta["default_map"] == rows["m1"]["prediction"]
    assert set(meta["downloads"]) == {"geojson", "tiff", "summary", "overlay"}
    patches = client.get("/api/slides/m1/patches").json()
    with h5py.File(Layout(out).heatmap_file("default", "m1", "scores.h5")) as fh:
        expected = fh["class_attention_percentile"][:]
    for k, name in enumerate(meta["maps"]):
        assert np.allclose(patches["percentile"][name], expected[k], atol=0.01)
        assert client.get(f"/tiles/m1/overlay/{name}/viridis/{meta['levels'] - 1}/1_1.png").status_code == 200
    assert client.get("/api/slides/glass/patches").status_code == 404


def test_a_survival_study_made_by_the_real_stages_shows_time_event_and_risk(mapped, tmp_path):
    """train (Cox) -> heatmap -> the study API: the task's columns, each slide's risk as the heatmap gives it,
    its time and event from train's out-of-fold predictions, and one map (no classes) per slide."""
    out, client = _trained_study(mapped, tmp_path, "slide_id,os,dead\nm0,30.5,0\nm1,4.25,1\nglass,12,1\n",
                                 "train.task=survival", "train.survival.loss=cox", "train.survival.time_column=os",
                                 "train.survival.event_column=dead", "train.batch_size=2")
    study = client.get("/api/study").json()
    assert study["task"] == "survival" and {"time", "event", "risk"} <= set(study["columns"])
    rows = {r["slide_id"]: r for r in study["slides"]}
    for sid, (time_, event) in {"m0": (30.5, 0), "m1": (4.25, 1)}.items():
        summary = json.loads(Layout(out).heatmap_summary("default", sid).read_text())
        assert rows[sid]["values"]["time"] == time_ and rows[sid]["values"]["event"] == event
        assert rows[sid]["values"]["risk"] == pytest.approx(summary["outputs"]["risk"])
        meta = client.get(f"/api/slides/{sid}").json()
        assert meta["task"] == "survival" and meta["maps"] == ["attention"] and "risk" in meta["headline"]


# -- safety --------------------------------------------------------------------------------------------

_OPENED: list[str] = []


def _audit(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def test_traversal_attempts_get_404_and_read_nothing(study, tmp_path):
    out = study / "out"
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "summary.json").write_text('{"prediction": "LEAKED"}')
    (secret / "heatmap.tiff").write_text("LEAKED")
    layout = Layout(out)
    outside = layout.heatmap_dir("default", "syn_000") / "heatmap.tiff"
    outside.symlink_to(secret / "heatmap.tiff")
    (layout.heatmaps_dir("default") / "evil").symlink_to(secret, target_is_directory=True)
    try:
        client = local_client(create_app(Study(out, study / "slides")))
        s = str(secret)
        attempts = [
            "/api/slides/..%2F..%2F..%2Fetc%2Fpasswd", "/api/slides/%2e%2e", "/api/slides/..",
            "/tiles/..%2Fpatches%2Fsyn_000/slide/0/0_0.jpeg", "/thumbs/..%2F..%2Fmanifest.jpeg",
            "/download/syn_000/..%2F..%2F..%2Fmanifest.csv", "/download/..%2Fsyn_000/summary",
            f"/download/{s.replace('/', '%2F')}/summary", f"/download/{s}/summary", "/download//etc/passwd",
            "/download/syn_000/tiff",  # a symlink out of the study
            "/download/evil/summary", "/api/slides/evil", "/patches/evil/0.jpeg",  # a folder symlinked out
            "/static/..%2F..%2Flayout.py", "/static/%2e%2e/app.py", "/slides/..%2F..%2Fetc%2Fpasswd",
            "/static/vendor/..%2F..%2F..%2F..%2Fpyproject.toml",
        ]
        _OPENED.clear()
        for url in attempts:
            res = client.get(url)
            assert res.status_code == 404, url
            assert b"LEAKED" not in res.content and b"root:" not in res.content, url
        assert not [p for p in _OPENED if p.startswith(s) or p.endswith("passwd") or p.endswith("manifest.csv")]
        rows = {r["slide_id"]: r for r in client.get("/api/study").json()["slides"]}
        assert rows["evil"]["prediction"] is None  # listed by its folder, but nothing read through it
        assert "tiff" not in client.get("/api/slides/syn_000").json()["downloads"]
    finally:
        outside.unlink()
        (layout.heatmaps_dir("default") / "evil").unlink()


def test_off_loopback_every_request_needs_the_token(study):
    assert token_for("127.0.0.1") is None and token_for("localhost") is None
    token = token_for("0.0.0.0")
    assert token and token != token_for("0.0.0.0") and len(token) >= 24
    assert view_url("0.0.0.0", 8123, token).endswith(f":8123/?token={token}")
    client = local_client(create_app(Study(study / "out", study / "slides"), token=token))
    for url in ("/", "/api/study", "/tiles/syn_001/slide/0/0_0.jpeg", "/static/study.js", "/slides/syn_001"):
        assert client.get(url).status_code == 403, url
    assert client.get("/api/study?token=wrong").status_code == 403
    assert client.get("/api/study", headers={"Authorization": f"token {token}"}).status_code == 200
    first = client.get(f"/?token={token}")
    assert first.status_code == 200 and "HttpOnly" in first.headers["set-cookie"]
    assert client.get("/api/study").status_code == 200  # the cookie the first request set


def test_the_server_writes_nothing_into_the_study(study, client):
    out = study / "out"

    def snapshot():
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*")}

    before = snapshot()
    for sid in ("syn_000", "syn_001", XSS_ID):
        meta = client.get(f"/api/slides/{sid}").json()
        client.get(f"/api/slides/{sid}/patches")
        for level in range(meta["levels"]):
            client.get(f"/tiles/{sid}/slide/{level}/0_0.jpeg")
            client.get(f"/tiles/{sid}/overlay/attention/magma/{level}/0_0.png")
            client.get(f"/tiles/{sid}/contour/{level}/0_0.png")
        client.get(f"/thumbs/{sid}.jpeg")
        client.get(f"/patches/{sid}/0.jpeg")
        for url in meta["downloads"].values():
            assert client.get(url).status_code == 200
    assert snapshot() == before


def test_pages_forbid_inline_script_and_missing_assets_are_one_line(study, monkeypatch, capsys):
    client = local_client(create_app(Study(study / "out")))
    csp = client.get("/").headers["content-security-policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp.split("style-src")[0]
    assert client.get("/slides/no-such-slide").status_code == 404
    monkeypatch.setattr(viewer_app, "OSD_ASSET", study / "missing.js")
    assert main(["view", "--out", str(study / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "make viewer-assets" in err and "npm" in err
    monkeypatch.undo()
    assert main(["view", "--out", str(study / "nowhere")]) == 2
    assert "no such output folder" in capsys.readouterr().err


# -- in Chromium ---------------------------------------------------------------------------------------

def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _serve(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def server(study):
    yield from _serve(create_app(Study(study / "out", study / "slides")))


@pytest.fixture(scope="module")
def survival_study(study, tmp_path_factory) -> tuple[Path, dict]:
    """The study's slides under a survival run: heatmaps in the heatmap stage's format carrying a risk
    (their summary's ``outputs``), and train's out-of-fold predictions with time, event and risk."""
    out = tmp_path_factory.mktemp("survival") / "out"
    shutil.copytree(study / "out", out, ignore=shutil.ignore_patterns("heatmaps", "models"))
    layout = Layout(out)
    ids = sorted(p.stem for p in (study / "slides").glob("*.svs"))
    rng = np.random.default_rng(5)
    truth = {sid: {"time": round(float(rng.uniform(1, 60)), 2), "event": int(i % 3 != 0),
                   "risk": round(float(rng.normal()), 4)} for i, sid in enumerate(ids)}
    for i, sid in enumerate(ids):
        write_truth_heatmap(layout, "surv", sid, study / "truth", seed=i)
        path = layout.heatmap_summary("surv", sid)
        summary = json.loads(path.read_text())
        risk = truth[sid]["risk"]
        path.write_text(json.dumps({**summary, "task": "survival", "prediction": f"{risk:.3g}", "probabilities": {},
                                    "outputs": {"risk": risk}, "title": f"risk: {risk:.3g}"}))
    write_csv(layout.out_of_fold("surv"), [{"slide_id": sid, "patient_id": sid, "time": t["time"], "event": t["event"],
                                           "fold": 0, "risk": t["risk"], "note": ""} for sid, t in truth.items()])
    (layout.run_dir("surv") / "summary.json").write_text(json.dumps({"task": "survival"}))
    return out, truth


@pytest.fixture(scope="module")
def survival_server(study, survival_study):
    yield from _serve(create_app(Study(survival_study[0], study / "slides", run="surv")))


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    if exe is None:
        print("\nSKIPPED browser tests: Chromium is not installed (apt-get install -y chromium; make test does it "
              "when run as root)", file=sys.stderr)
        pytest.skip("Chromium not installed: apt-get install -y chromium (make test installs it when root)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    # bypass_csp lets Playwright evaluate its probes; the escaping test so checks escaping, not the CSP
    context = browser.new_context(viewport={"width": 1280, "height": 800}, bypass_csp=True)
    page = context.new_page()
    page.problems = []
    page.dialogs = []
    page.on("console", lambda m: page.problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.problems.append(str(e)))

    def on_dialog(d):
        page.dialogs.append(d.message)
        d.dismiss()

    page.on("dialog", on_dialog)
    page.outside = []  # offline: nothing may be fetched from anywhere but the viewer itself

    def route(r):
        if r.request.url.startswith("http://127.0.0.1:"):
            return r.continue_()
        page.outside.append(r.request.url)
        return r.abort()

    page.route("**/*", route)
    yield page
    assert page.outside == [], f"fetched from outside the viewer: {page.outside}"
    context.close()


def shot(page, name: str) -> np.ndarray:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def settle(page) -> None:
    """Every visible layer fully loaded and drawn, twice in a row 300 ms apart (a busy machine can still
    be swapping in sharper tiles after the first)."""
    loaded = ("wsi.ready && wsi.viewer.world.getItemAt(0).getFullyLoaded() && !wsi.viewer.world.needsDraw() && "
              "[wsi.overlay, wsi.contour].every(l => !l || l.getOpacity() === 0 || l.getFullyLoaded())")
    for _ in range(2):
        page.wait_for_function(loaded, timeout=20000)
        page.wait_for_timeout(300)


def open_slide_page(page, server, sid: str) -> None:
    page.goto(f"{server}/slides/{sid}")
    page.wait_for_function("window.wsi && window.wsi.ready", timeout=20000)
    settle(page)


def screen_points(page, pts: np.ndarray) -> np.ndarray:
    return np.array(page.evaluate("""pts => {
        const item = wsi.viewer.world.getItemAt(0), r = wsi.viewer.element.getBoundingClientRect();
        return pts.map(([x, y]) => {
            const p = wsi.viewer.viewport.viewportToViewerElementCoordinates(item.imageToViewportCoordinates(x, y));
            return [p.x + r.left, p.y + r.top]; });
    }""", pts.tolist()))


def colours(img: np.ndarray, pts: np.ndarray, r: int = 2) -> np.ndarray:
    return np.array([img[int(y) - r:int(y) + r + 1, int(x) - r:int(x) + r + 1].reshape(-1, 3).mean(0) for x, y in pts])


def truth_points(study: Path, sid: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Centres of patches wholly inside the true tumour, and of tissue patches wholly outside it."""
    coords, attrs = read_coords(Layout(study / "out").patches(sid))
    size = float(attrs["patch_size_level0"])
    mask, mpp = load_truth(study / "truth", sid, "tumour")
    frac = tumour_fraction(coords, size, mask, mpp / float(attrs["slide_mpp"]))
    with h5py.File(Layout(study / "out").patches(sid)) as fh:
        tissue = fh["tissue_fraction"][:]
    centres = coords + size / 2
    return centres[frac >= 0.95], centres[(frac == 0) & (tissue >= 0.95)], size


def test_study_page_lists_every_slide_without_console_errors(study, server, page):
    page.goto(server)
    page.wait_for_selector("body[data-ready]")
    rows = page.locator("#slides tbody tr")
    assert rows.count() == len(list((study / "slides").glob("*.svs")))
    shot(page, "study_page")
    assert page.problems == []
    page.fill("#filter", "tumour")
    assert 0 < rows.count() < len(list((study / "slides").glob("*.svs")))
    page.fill("#filter", "")
    page.click("th[data-key=n_patches]")
    patches = [int(t) for t in page.locator("#slides tbody tr td:nth-child(6)").all_inner_texts()]
    assert patches == sorted(patches)


def test_a_survival_study_shows_time_event_and_risk_sortable_and_the_slide_page_its_risk(
        study, survival_study, survival_server, page):
    out, truth = survival_study
    page.goto(survival_server)
    page.wait_for_selector("body[data-ready]")
    heads = page.locator("#slides thead th").all_inner_texts()
    assert heads == ["thumbnail", "slide", "time", "event", "risk", "patches", "status"]
    page.click("th[data-key=risk]")
    names = page.locator("#slides tbody tr td:nth-child(2)").all_inner_texts()
    risks = [float(t) for t in page.locator("#slides tbody tr td:nth-child(5)").all_inner_texts()]
    assert names == sorted(truth, key=lambda sid: truth[sid]["risk"]) and risks == sorted(risks)
    assert risks == pytest.approx(sorted(t["risk"] for t in truth.values()), abs=1e-3)
    row = page.locator("#slides tbody tr", has_text="syn_001").first.locator("td").all_inner_texts()
    assert float(row[2]) == truth["syn_001"]["time"] and row[3] == str(truth["syn_001"]["event"])
    page.click("th[data-key=time]")
    times = [float(t) for t in page.locator("#slides tbody tr td:nth-child(3)").all_inner_texts()]
    assert times == sorted(times)
    assert "survival" in page.inner_text("#run")
    shot(page, "survival_study_page")
    open_slide_page(page, survival_server, "syn_001")
    text = page.inner_text("#prediction")
    assert f"risk {truth['syn_001']['risk']:.3f}" in text and f"event {truth['syn_001']['event']}" in text
    shot(page, "survival_slide_page")
    assert page.problems == []


def test_names_labels_and_reasons_are_shown_as_text_and_no_script_runs(study, server, page):
    page.goto(server)
    page.wait_for_selector("body[data-ready]")
    row = page.locator("#slides tbody tr", has_text="alert(1)>").first
    cells = row.locator("td").all_inner_texts()
    assert XSS_ID in cells[1] and cells[2] == XSS_TEXT and f"reason {XSS_TEXT}" in cells[6]
    assert page.locator("#slides script, #slides img[src=x]").count() == 0
    row.locator("a").click()
    page.wait_for_function("window.wsi && window.wsi.ready", timeout=20000)
    assert page.inner_text("#title") == XSS_ID
    page.wait_for_timeout(500)
    shot(page, "slide_page_awkward_name")
    assert page.dialogs == [] and page.problems == []


def test_slide_page_draws_the_slide_and_the_overlay_where_the_truth_is(study, server, page):
    sid = "syn_001"
    open_slide_page(page, server, sid)
    page.fill("#opacity", "0.8")
    page.dispatch_event("#opacity", "input")
    settle(page)
    on = shot(page, "slide_page")
    page.uncheck("#overlay")
    settle(page)
    off = shot(page, "slide_page_overlay_off")
    page.check("#overlay")
    settle(page)
    on_again = shot(page, "slide_page_overlay_on_again")
    assert page.problems == []

    hot_pts, cool_pts, size = truth_points(study, sid)
    assert len(hot_pts) >= 3 and len(cool_pts) >= 3
    hot, cool = screen_points(page, hot_pts), screen_points(page, cool_pts)
    # the slide is drawn: tissue pixels are not blank, and match the slide read directly
    canvas = off[60:780, 10:760]
    assert canvas.std() > 20 and (canvas.mean(2) < 230).mean() > 0.1
    scale = 1 / page.evaluate("wsi.viewer.world.getItemAt(0).viewportToImageZoom(wsi.viewer.viewport.getZoom(true))")
    with open_slide(study / "slides" / f"{sid}.svs") as reader:
        expected = np.array([reader.read_region((int(x - 2.5 * scale), int(y - 2.5 * scale)), 0,
                                                (int(5 * scale), int(5 * scale))).reshape(-1, 3).mean(0)
                             for x, y in np.r_[hot_pts, cool_pts]])
    seen_off = colours(off, np.r_[hot, cool])
    assert np.abs(seen_off - expected).mean() < 20, "overlay off: the slide's own colours"
    # overlay on: hot (red over blue) inside the true tumour, cool (blue over red) on tissue outside it
    c_hot, c_cool = colours(on, hot), colours(on, cool)
    assert ((c_hot[:, 0] - c_hot[:, 2]) > 50).mean() >= 0.9
    assert ((c_cool[:, 2] - c_cool[:, 0]) > 30).mean() >= 0.9
    # off again is the slide again, and on again is the same overlay
    assert np.abs(colours(on_again, np.r_[hot, cool]) - colours(on, np.r_[hot, cool])).mean() < 3
    assert np.abs(seen_off - colours(on, np.r_[hot, cool])).mean() > 40


def test_opacity_slider_changes_the_blend(study, server, page):
    sid = "syn_001"
    open_slide_page(page, server, sid)
    hot_pts, _, _ = truth_points(study, sid)
    pts = screen_points(page, hot_pts)
    seen = {}
    for value in ("0", "0.3", "0.9"):
        page.fill("#opacity", value)
        page.dispatch_event("#opacity", "input")
        settle(page)
        seen[value] = colours(shot(page, f"slide_page_opacity_{value}"), pts)
    d_low = np.abs(seen["0.3"] - seen["0"]).mean()
    d_high = np.abs(seen["0.9"] - seen["0"]).mean()
    assert d_low > 10 and d_high > 2 * d_low


def test_a_click_on_the_first_top_patch_centres_the_view_on_it(study, server, page):
    sid = "syn_003"
    open_slide_page(page, server, sid)
    with h5py.File(Layout(study / "out").heatmap_file("default", sid, "scores.h5")) as fh:
        coords, pct = fh["coords"][:], fh["attention_percentile"][:]
        size = float(fh["coords"].attrs["patch_size_level0"])
    best = int(np.argsort(-pct, kind="stable")[0])
    first = page.locator("#gallery-top button").first
    assert int(first.get_attribute("data-patch")) == best
    first.click()
    page.wait_for_function("wsi.flownTo !== undefined && wsi.viewer.viewport.getCenter(true).distanceTo("
                           "wsi.viewer.viewport.getCenter(false)) < 1e-6", timeout=10000)
    settle(page)
    shot(page, "slide_page_top_patch")
    centre = page.evaluate("""() => { const c = wsi.viewer.world.getItemAt(0).viewportToImageCoordinates(
        wsi.viewer.viewport.getCenter(true)); return [c.x, c.y]; }""")
    assert np.abs(np.array(centre) - (coords[best] + size / 2)).max() < 0.25 * size
    assert page.locator(f".patch-outline[data-patch='{best}']").count() == 1
    um = page.inner_text("#scalebar-text")
    assert um.endswith("µm") or um.endswith("mm")


def test_hover_scale_bar_colormap_contour_and_downloads(study, server, page):
    sid = "syn_001"
    open_slide_page(page, server, sid)
    with h5py.File(Layout(study / "out").heatmap_file("default", sid, "scores.h5")) as fh:
        coords, pct, logits = fh["coords"][:], fh["attention_percentile"][:], fh["attention_logits"][:]
        size = float(fh["coords"].attrs["patch_size_level0"])
    # hover: the patch under the pointer, its attention and percentile, the class probabilities
    i = int(np.argsort(pct)[len(pct) // 2])
    (x, y), = screen_points(page, (coords[i:i + 1] + size / 2))
    page.mouse.move(x, y)
    page.wait_for_selector("#hover", state="visible")
    text = page.inner_text("#hover")
    assert f"patch {i} " in text and f"percentile {pct[i]:.1f}" in text and f"attention {logits[i]:.3f}" in text
    assert "p(tumour)" in text and "p(normal)" in text
    # scale bar: its width in screen px times µm per screen px is the length it is labelled with
    width = page.evaluate("document.getElementById('scalebar-bar').getBoundingClientRect().width")
    zoom = page.evaluate("wsi.viewer.world.getItemAt(0).viewportToImageZoom(wsi.viewer.viewport.getZoom(true))")
    label = page.inner_text("#scalebar-text")
    um = float(label.split()[0]) * (1000 if label.endswith("mm") else 1)
    assert abs(width * 0.5 / zoom - um) / um < 0.02  # the slide is 0.5 µm/px
    # colormap: viridis's top is yellow, jet's is red
    hot_pts, _, _ = truth_points(study, sid)
    hot = screen_points(page, hot_pts)
    page.fill("#opacity", "1")
    page.dispatch_event("#opacity", "input")
    settle(page)
    jet = colours(shot(page, "slide_page_jet"), hot)
    page.select_option("#cmap", "viridis")
    page.wait_for_function("wsi.overlay && wsi.overlay.source.getTileUrl(0, 0, 0).includes('/viridis/')")
    settle(page)
    viridis = colours(shot(page, "slide_page_viridis"), hot)
    assert (jet[:, 0] - jet[:, 1]).mean() > 60 and (viridis[:, 1] - viridis[:, 2]).mean() > 60
    # tissue contour: turning it on adds green pixels only
    page.uncheck("#overlay")
    settle(page)
    before = shot(page, "slide_page_contour_off").astype(int)
    page.check("#contour")
    settle(page)
    after = shot(page, "slide_page_contour_on").astype(int)
    band = (slice(200, 780), slice(0, 975))  # below OpenSeadragon's buttons and navigator, which fade by themselves
    changed = np.abs(after[band] - before[band]).sum(2) > 60
    assert changed.sum() > 200
    shift = (after[band] - before[band])[changed]  # the line and its anti-aliased edges pull every pixel to green
    assert ((shift[:, 1] - shift[:, 0]) > 20).mean() > 0.9 and ((shift[:, 1] - shift[:, 2]) > 20).mean() > 0.9
    # downloads: the slide's files, served
    links = page.locator("#downloads a")
    assert sorted(links.all_inner_texts()) == ["geojson", "summary"]
    for href in links.evaluate_all("els => els.map(e => e.getAttribute('href'))"):
        assert page.request.get(server + href).status == 200


def test_deep_zoom_tiles_agree_between_backends(study):
    from wsi_mil.slide.deepzoom import deepzoom
    from wsi_mil.slide.reader import SlideReader

    path = study / "slides" / "syn_003.svs"
    with SlideReader(path, "openslide") as a, SlideReader(path, "tiffslide") as b:
        za, zb = deepzoom(a), deepzoom(b)
        assert za.level_count == zb.level_count and za.level_dimensions == zb.level_dimensions
        assert za.level_dimensions[-1] == a.dimensions  # the full level-0 extent: patch coordinates apply
        for level, address in ((za.level_count - 1, (3, 4)), (za.level_count - 3, (0, 1)), (2, (0, 0))):
            ta, tb = np.asarray(za.get_tile(level, address)), np.asarray(zb.get_tile(level, address))
            assert ta.shape == tb.shape and np.abs(ta.astype(int) - tb).mean() < 3, level


def test_the_study_page_sees_what_stages_record_while_it_runs(study, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(study / "out", out, symlinks=True)
    client = local_client(create_app(Study(out, study / "slides")))
    before = {r["slide_id"] for r in client.get("/api/study").json()["slides"]}
    time.sleep(0.01)
    update_manifest(Layout(out).manifest, [Record("late_slide", "tile", "failed", 0.0, "cannot open slide")])
    rows = {r["slide_id"]: r for r in client.get("/api/study").json()["slides"]}
    assert set(rows) == before | {"late_slide"} and rows["late_slide"]["reasons"] == ["tile: cannot open slide"]


def test_a_slide_without_mpp_metadata_shows_with_the_mpp_the_tile_stage_used(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "nompp.svs", SyntheticSpec(width=1536, height=1536, mpp=0.5, seed=3,
                                                    mpp_in_metadata=False, resolution_tags=False,
                                                    objective_in_metadata=False))
    out = tmp_path / "out"
    assert main(["tile", "--slides", str(slides), "--out", str(out), "--no-progress", "slides.default_mpp=0.5"]) == 0
    client = local_client(create_app(Study(out, slides)))
    meta = client.get("/api/slides/nompp").json()
    assert meta["mpp"] == pytest.approx(0.5) and meta["width"] == 1536
    (out / "patches" / "nompp.h5").unlink()  # nothing recorded and nothing in the file: no scale bar
    client = local_client(create_app(Study(out, slides)))
    assert client.get("/api/slides/nompp").json()["mpp"] is None


# -- issue 17: the viewer under hostile requests and concurrent load ------------------------------------

def test_a_foreign_host_header_is_refused_as_jupyter_does(study):
    app = create_app(Study(study / "out", study / "slides"), allow_hosts=("lab.example.org",))
    for host, code in (("evil.example.com", 403), ("evil.example.com:8000", 403), ("127.0.0.1:8000", 200),
                       ("localhost", 200), ("[::1]:8000", 200), ("lab.example.org:8000", 200),
                       ("127.0.0.1.evil.com", 403)):
        client = TestClient(app, base_url=f"http://{host}")
        for url in ("/api/study", "/download/syn_001/summary", "/"):
            assert client.get(url).status_code == code, (host, url)
    anywhere = TestClient(create_app(Study(study / "out", study / "slides"), bind="0.0.0.0"),
                          base_url="http://10.1.2.3:8000")
    assert anywhere.get("/api/study").status_code == 200  # an IP literal cannot be rebound by DNS
    assert TestClient(create_app(Study(study / "out", study / "slides"), bind="0.0.0.0"),
                      base_url="http://evil.example.com").get("/api/study").status_code == 403


@pytest.fixture(scope="module")
def odd_study(tmp_path_factory) -> Path:
    """Slides whose ids hold URL metacharacters and non-ASCII text, tiled, with heatmaps."""
    root = tmp_path_factory.mktemp("odd")
    slides = root / "slides"
    slides.mkdir()
    for i, name in enumerate(("a%b?c#d", "é中文", "plain")):
        write_slide(slides / f"{name}.svs", SyntheticSpec(width=1536, height=1280, seed=30 + i))
    out = root / "out"
    assert main(["tile", "--slides", str(slides), "--out", str(out), "--no-progress"]) == 0
    for sid in ("a%b?c#d", "é中文", "plain"):
        write_truth_heatmap(Layout(out), "default", sid, root / "truth")
    return root


def test_download_links_of_ids_with_url_characters_resolve(odd_study):
    from urllib.parse import quote

    client = local_client(create_app(Study(odd_study / "out", odd_study / "slides")))
    for sid in ("a%b?c#d", "é中文"):
        meta = client.get(f"/api/slides/{quote(sid, safe='')}").json()
        assert meta["slide_id"] == sid and meta["downloads"]
        for href in meta["downloads"].values():
            res = client.get(href)
            assert res.status_code == 200, href


def test_every_response_says_nosniff(odd_study):
    client = local_client(create_app(Study(odd_study / "out", odd_study / "slides")))
    urls = ["/", "/api/study", "/api/slides/plain", "/api/colormaps", "/tiles/plain/slide/0/0_0.jpeg",
            "/tiles/plain/contour/0/0_0.png", "/thumbs/plain.jpeg", "/download/plain/summary",
            "/static/study.js", "/api/slides/nope", "/tiles/plain/slide/99/0_0.jpeg"]
    for url in urls:
        res = client.get(url)
        assert res.headers.get("x-content-type-options") == "nosniff", (url, res.status_code)


def test_huge_indices_truncated_scores_bad_manifests_and_deleted_slides_are_not_5xx(odd_study, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(odd_study / "out", out)
    slides = tmp_path / "slides"
    shutil.copytree(odd_study / "slides", slides)
    layout = Layout(out)
    scores = layout.heatmap_file("default", "plain", "scores.h5")
    scores.write_bytes(scores.read_bytes()[: scores.stat().st_size // 3])  # truncated outside our tools
    layout.manifest.write_bytes(b"slide_id,stage,status,seconds,reason\nplain,tile,failed,0,\xff\xfe bad bytes\n")
    summary = layout.heatmap_summary("default", "plain")  # hand-edited: NaN, text and a list where numbers go
    edited = {**json.loads(summary.read_text()), "outputs": {"risk": float("nan"), "pred": "high"},
              "probabilities": [1, 2], "title": 7}
    summary.write_text(json.dumps(edited))  # json writes the NaN as NaN, which json.loads reads back
    client = local_client(create_app(Study(out, slides)))
    row = next(r for r in client.get("/api/study").json()["slides"] if r["slide_id"] == "plain")
    assert row["probabilities"] == {} and "risk" not in row["values"] and row["headline"] == "7"
    assert client.get("/tiles/plain/slide/" + "9" * 5000 + "/0_0.jpeg").status_code == 404
    assert client.get("/patches/plain/" + "1" * 5000 + ".jpeg").status_code == 404
    assert client.get("/api/study").status_code == 200
    meta = client.get("/api/slides/plain")
    assert meta.status_code == 200 and meta.json()["maps"] == []
    assert client.get("/tiles/plain/overlay/attention/jet/5/0_0.png").status_code == 404
    assert client.get("/api/slides/plain/patches").status_code == 404
    assert client.get("/tiles/plain/slide/3/0_0.jpeg").status_code == 200
    (slides / "plain.svs").unlink()  # deleted while the viewer runs
    for url in ("/api/slides/plain", "/tiles/plain/slide/3/0_0.jpeg", "/thumbs/plain.jpeg"):
        assert client.get(url).status_code == 404, url


LOAD_SERVER = """
import sys, uvicorn
from wsi_mil.viewer.app import create_app
from wsi_mil.viewer.study import Study
from wsi_mil.viewer.serve import bind_socket
sock = bind_socket("127.0.0.1", 0)
print(sock.getsockname()[1], flush=True)
app = create_app(Study(sys.argv[1], sys.argv[2]), view_limit=2)
uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
"""


def _load_round(base: str, out: Path, slide_ids: list[str], clients: int = 16, per_client: int = 40) -> dict:
    """``clients`` threads over every slide (more than the handle cache holds) while one refreshes the study."""
    import httpx

    counts: dict = {}
    lock = threading.Lock()
    stop = threading.Event()

    def refresher():
        with httpx.Client(base_url=base, timeout=30) as c:
            while not stop.is_set():
                os.utime(Layout(out).manifest)  # a stage recorded something: the next /api/study reopens slides
                r = c.get("/api/study")
                with lock:
                    counts[r.status_code] = counts.get(r.status_code, 0) + 1
                time.sleep(0.02)

    def worker(seed: int):
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=base, timeout=60) as c:
            for _ in range(per_client):
                sid = slide_ids[int(rng.integers(len(slide_ids)))]
                level = int(rng.integers(9, 12))
                url = [f"/tiles/{sid}/slide/{level}/0_0.jpeg", f"/tiles/{sid}/slide/{level}/1_1.jpeg",
                       f"/api/slides/{sid}", f"/tiles/{sid}/contour/{level}/0_0.png",
                       f"/tiles/{sid}/overlay/attention/jet/{level}/0_0.png"][int(rng.integers(5))]
                try:
                    code = c.get(url).status_code
                except httpx.TransportError:
                    code = "connection failed"
                with lock:
                    counts[code] = counts.get(code, 0) + 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    side = threading.Thread(target=refresher)
    side.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    stop.set()
    side.join(60)
    return counts


def test_many_clients_over_more_slides_than_the_handle_cache_with_refreshes_get_no_5xx(study, tmp_path):
    """The handle cache holds 2 slides here, so handles are evicted and the study refreshed all the time while
    other threads read from them. Before handles were reference-counted this aborted the process
    (OpenSlide's ``tc->outstanding == 0`` assertion) or answered 500 "closed slide"."""
    out = tmp_path / "out"
    shutil.copytree(study / "out", out, symlinks=True)
    ids = sorted(p.stem for p in (study / "slides").glob("syn_*.svs"))
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", LOAD_SERVER, str(out), str(study / "slides")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            port = int(proc.stdout.readline())
            counts = _load_round(f"http://127.0.0.1:{port}", out, ids)
            alive = proc.poll() is None
        finally:
            proc.kill()
            err = proc.communicate(timeout=30)[1]
        bad = {k: v for k, v in counts.items() if not isinstance(k, int) or k >= 500}
        assert alive and not bad, (round_, counts, err[-2000:])
        assert counts.get(200, 0) > 300, counts


def test_view_port_errors_are_one_line(study, tmp_path):
    def view(*args):
        return subprocess.run([sys.executable, "-m", "wsi_mil.cli", "view", "--out", str(study / "out"), *args],
                               capture_output=True, text=True, timeout=120)

    proc = view("--port", "99999")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --port 99999: must be between 0 and 65535"], proc.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = view("--port", str(port))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "already in use" in lines[0], proc.stderr
    assert "http://" not in proc.stdout  # no URL that belongs to the other server
