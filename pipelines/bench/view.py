"""view: tile latency of `wsi-mil view` (its own process) under 8 concurrent local clients."""

from __future__ import annotations

import sys
import time

import numpy as np

from .common import mapped_study, pyramid_slide
from .options import Options


def _tile_urls(meta: dict, coords: np.ndarray, size0: float, level: int, kind: str, n: int, rng) -> list[str]:
    """``n`` distinct tile URLs of one kind at one Deep Zoom level, over tissue (patch centres)."""
    scale = 2 ** (meta["levels"] - 1 - level)
    cells = np.unique(((coords + size0 / 2) / scale // meta["tile_size"]).astype(int), axis=0)
    cells = cells[rng.permutation(len(cells))[:n]]
    sid = meta["slide_id"]
    if kind == "slide":
        return [f"/tiles/{sid}/slide/{level}/{c}_{r}.jpeg" for c, r in cells]
    return [f"/tiles/{sid}/overlay/{meta['default_map']}/jet/{level}/{c}_{r}.png" for c, r in cells]


def _load(port: int, urls: list[str], clients: int = 8) -> list[float]:
    """Fetch every URL once from ``clients`` threads (keep-alive, 127.0.0.1 only); seconds per request."""
    import http.client
    from concurrent.futures import ThreadPoolExecutor

    chunks = [urls[i::clients] for i in range(clients)]

    def run(chunk):
        conn, times = http.client.HTTPConnection("127.0.0.1", port, timeout=10), []
        for url in chunk:
            t0 = time.perf_counter()
            conn.request("GET", url)
            res = conn.getresponse()
            body = res.read()
            times.append(time.perf_counter() - t0)
            if res.status != 200 or not body:
                raise RuntimeError(f"{url}: HTTP {res.status}")
        conn.close()
        return times

    with ThreadPoolExecutor(clients) as pool:
        return [t for times in pool.map(run, chunks) for t in times]


def run(opts: Options) -> None:
    """Tile latency of ``wsi-mil view`` (a separate server process) under 8 concurrent local clients."""
    cache, quick = opts.cache, opts.quick
    import json
    import socket
    import subprocess
    import urllib.request

    from wsi_mil.formats import read_patch_spec
    from wsi_mil.slide import SlideRef
    from wsi_mil.stages.heatmap import heatmap_slide

    w, h = (8000, 6000) if quick else (100_000, 80_000)
    slide = pyramid_slide(cache, "aperio 1/4/16/64", w, h)  # what scanners write, not a level at every 2x
    out, cfg, coords = mapped_study(cache, slide, "view_out")
    if not out.heatmap_summary("default", slide.stem).exists():
        heatmap_slide(SlideRef(slide.stem, slide), cfg, out)
    size0 = float(read_patch_spec(out.patches(slide.stem)).patch_size_level0)
    listing = cache / "view_slides.csv"
    listing.write_text(f"path\n{slide.resolve()}\n")
    n = 16 if quick else 240
    print(f"\n== view: {slide.name} ({w:,} x {h:,}, JPEG, levels 1/4/16/64), 256-px tiles, {n} requests per row from 8 concurrent "
          f"keep-alive clients, server = `wsi-mil view` in its own process on 127.0.0.1 (2 cores shared)")

    def start():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "wsi_mil.cli", "view", "--out", str(out.root), "--slides",
                                 str(listing), "--port", str(port)], stdout=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/study", timeout=2):
                    return proc, port
            except OSError:
                time.sleep(0.2)
        proc.kill()
        raise RuntimeError("the viewer did not start within 60 s")

    rng = np.random.default_rng(0)
    proc, port = start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/slides/{slide.stem}", timeout=30) as res:
            meta = json.load(res)
        deepest = meta["levels"] - 1
        # the overview: the coarsest level with n distinct tissue tiles (every cold request a new tile)
        overview = min(lv for lv in range(deepest + 1) if len(_tile_urls(meta, coords, size0, lv, "slide", n, rng)) >= n)
        rows = [(kind, name, level) for kind in ("slide", "overlay")
                for name, level in (("deepest", deepest), ("overview", overview))]
        urls = {r: _tile_urls(meta, coords, size0, r[2], r[0], n, rng) for r in rows}
        print(f"  levels: deepest {deepest} (1 level-0 px per px), overview {overview} "
              f"(1:{2 ** (deepest - overview)}, {w // 2 ** (deepest - overview)} px wide)")
        print(f"  {'tiles':22s} {'n':>4s} {'cold p50':>9s} {'cold p95':>9s} {'warm p50':>9s} {'warm p95':>9s}")
        for r in rows:
            _load(port, [f"/api/slides/{slide.stem}"], 1)  # the slide opened, its raster built: not a tile's cost
            cold = _load(port, urls[r])
            warm = _load(port, urls[r])
            c, wm = np.array(cold) * 1000, np.array(warm) * 1000
            print(f"  {r[0] + ' ' + r[1]:22s} {len(cold):4d} {np.percentile(c, 50):7.1f}ms {np.percentile(c, 95):7.1f}ms "
                  f"{np.percentile(wm, 50):7.1f}ms {np.percentile(wm, 95):7.1f}ms", flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    print("  target: cold p95 <= 100 ms for a 256-px tile on 2 cores; warm far less")
