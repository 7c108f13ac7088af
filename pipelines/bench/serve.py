"""serve: ``wsi-mil serve`` (its own process) answering 50 clients that each poll a job's status every
0.25 s (200 requests/s, staggered) while the job runs (tile, extract, predict, heatmap of synthetic slides); latency percentiles and the share of 5xx."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .options import Options

ENC = ["encoder.name=resnet18", "encoder.pretrained=false", "extract.num_workers=0", "extract.batch_size=16"]
HEAT = ["heatmap.exports=[png]", "heatmap.top_k=0"]


def _study(folder: Path, n: int, size: int) -> tuple[Path, Path]:
    """``n`` synthetic slides and a model trained on them (made once)."""
    from wsi_mil.cli import main
    from wsi_mil.synthetic import SyntheticSpec, write_slide

    slides, out = folder / "slides", folder / "out"
    model = out / "models" / "svc"
    if (model / "summary.json").is_file():
        return slides, model
    slides.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_slide(slides / f"s{i}.svs", SyntheticSpec(width=size, height=size * 7 // 8, mpp=0.5, seed=40 + i,
                                                         tumour=i % 2 == 1))
    labels = folder / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"s{i},{'tumour' if i % 2 else 'normal'}\n" for i in range(n)))
    with contextlib.redirect_stdout(io.StringIO()):
        for stage in ("tile", "extract"):
            assert main([stage, "--slides", str(slides), "--out", str(out), "--no-progress", *ENC]) == 0
        assert main(["train", "--out", str(out), "--no-progress", *ENC, f"train.labels={labels}", "train.folds=1",
                     "train.val_fraction=0", "train.epochs=2", "train.run_name=svc"]) == 0
    return slides, model


def _poll(port: int, job: str, n: int, every: float, offset: float) -> list[tuple[float, int]]:
    """``n`` status requests, one every ``every`` seconds from ``offset`` (a polling client, not a flood)."""
    import http.client

    conn, out = http.client.HTTPConnection("127.0.0.1", port, timeout=30), []
    start = time.perf_counter() + offset
    for i in range(n):
        time.sleep(max(0.0, start + i * every - time.perf_counter()))
        t0 = time.perf_counter()
        conn.request("GET", f"/v1/jobs/{job}")
        res = conn.getresponse()
        res.read()
        out.append((time.perf_counter() - t0, res.status))
    conn.close()
    return out


def run(opts: Options) -> None:
    import http.client

    clients, per_client, every = 50, (4 if opts.quick else 20), 0.25
    n, size = (2, 1024) if opts.quick else (8, 2048)
    slides, model = _study(opts.cache / f"serve_study_{n}x{size}", n, size)
    out = opts.cache / "serve_out"
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.Popen([sys.executable, "-m", "wsi_mil.cli", "serve", "--out", str(out), "--model", str(model),
                             "--port", "0", "--slides-root", str(slides), *ENC, *HEAT],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(re.search(r"127\.0\.0\.1:(\d+)/", proc.stdout.readline()).group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = json.dumps({"slides": [str(p) for p in sorted(slides.glob("*.svs"))]})
        conn.request("POST", "/v1/jobs", body, {"Content-Type": "application/json"})
        job = json.loads(conn.getresponse().read())["id"]
        time.sleep(0.5)  # the worker has taken the job
        with ThreadPoolExecutor(clients) as pool:
            results = [r for batch in pool.map(lambda i: _poll(port, job, per_client, every, every * i / clients),
                                               range(clients)) for r in batch]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # the first one idled past keep-alive
        conn.request("GET", f"/v1/jobs/{job}")
        during = json.loads(conn.getresponse().read())["status"]
    finally:
        proc.terminate()
        proc.wait(30)
    lat = np.array([t for t, _ in results]) * 1000
    errors = sum(s >= 500 for _, s in results)
    print(f"\n== serve: {clients} clients each polling a job's status every {every} s ({clients / every:.0f} "
          f"requests/s, keep-alive), {per_client} polls each, while a job of "
          f"{len(list(slides.glob('*.svs')))} slides runs (job {during} after the polls)")
    print(f"  p50 {np.percentile(lat, 50):.1f} ms, p95 {np.percentile(lat, 95):.1f} ms, max {lat.max():.1f} ms "
          f"(target p95 <= 50 ms on 2 cores); 5xx: {errors} of {len(results)}")
