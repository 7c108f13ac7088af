"""heatmap: seconds per slide for the heatmap stage with every export, on cached features."""

from __future__ import annotations

from .common import big_slide, mapped_study, timed
from .options import Options


def run(opts: Options) -> None:
    cache, quick = opts.cache, opts.quick
    import json

    from wsi_mil.slide import SlideRef
    from wsi_mil.stages.heatmap import heatmap_slide

    w, h = (8000, 6000) if quick else (100_000, 80_000)
    path = big_slide(cache, w, h, 0.25)
    out, cfg, coords = mapped_study(cache, path, "heatmap_out")
    print(f"\n== heatmap: {len(coords):,} patches from cached 1024-d features, 5-fold ensemble, every export "
          f"({', '.join(cfg.heatmap.exports)}), raster {cfg.heatmap.mpp} µm/px, no refinement")
    seconds, _ = timed(lambda: heatmap_slide(SlideRef(path.stem, path), cfg, out), repeat=3)
    summary = json.loads(out.heatmap_summary("default", path.stem).read_text())
    print(f"  seconds per slide     : {seconds:.2f} s (median of 3, in-process, model loaded once)")
    print(f"  raster                : {summary['raster_shape'][1]} x {summary['raster_shape'][0]} px")
