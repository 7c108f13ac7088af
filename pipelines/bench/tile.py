"""tile: the full tile stage on one synthetic slide per pyramid layout, the command beyond start-up, and
CLAM's tiler on the same slide in the same run when a checkout is given (--clam)."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .common import PYRAMIDS, pyramid_slide, timed, wall_in
from .options import Options


def run(opts: Options) -> None:
    cache, quick = opts.cache, opts.quick
    import cv2

    from wsi_mil.config import load_config
    from wsi_mil.formats import read_patch_file, read_tissue_mask
    from wsi_mil.layout import Layout
    from wsi_mil.slide import SlideReader, SlideRef
    from wsi_mil.stages import tile
    from wsi_mil.stages.base import run_stage
    from wsi_mil.synthetic import load_truth

    w, h = (8000, 6000) if quick else (100_000, 80_000)
    print(f"\n== tile: the full tile stage (open, mask, grid, every output written) on one synthetic {w}x{h} "
          f"JPEG slide at 0.25 µm/px, 256-px patches at 0.5 µm/px; seconds beyond interpreter start-up")
    cfg = load_config(None, ["runner.overwrite=true"])
    for name in PYRAMIDS:
        path = pyramid_slide(cache, name, w, h)
        with SlideReader(path) as r:
            levels = "/".join(f"{d:g}" for d in r.level_downsamples)
        layout = Layout(cache / "tile_out" / path.stem)
        ref = SlideRef(path.stem, path)
        seconds, _ = timed(lambda ref=ref, layout=layout: run_stage(tile.STAGE, [ref], cfg, layout, progress=False))
        mask = read_tissue_mask(layout.patches(path.stem)).mask
        n = len(read_patch_file(layout.patches(path.stem))[0])
        truth, _ = load_truth(cache / "truth", path.stem, "tissue")
        mask = cv2.resize(mask.astype(np.uint8), truth.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
        recall = (mask & truth).sum() / max(1, truth.sum())
        precision = (mask & truth).sum() / max(1, mask.sum())
        print(f"  {name:18s} (downsamples {levels}): {seconds:.3f} s (median of 3), {n:,} patches, "
              f"tissue recall {recall:.3f}, precision {precision:.3f}", flush=True)
    # the command itself, in fresh processes: wall time minus an interpreter that only imports what it imports

    path = pyramid_slide(cache, "aperio 1/4/16/64", w, h)
    listing = cache / "tile_cli_slides.csv"
    listing.write_text(f"path\n{path.resolve()}\n")
    cli = [sys.executable, "-m", "wsi_mil.cli", "tile", "--slides", str(listing), "--out",
           str(cache / "tile_out" / "cli"), "--overwrite", "--no-progress"]
    imports = [sys.executable, "-c", "import wsi_mil.cli, wsi_mil.stages.tile, wsi_mil.stages.base"]

    whole = statistics.median(wall_in(cli, Path.cwd()) for _ in range(5))
    start = statistics.median(wall_in(imports, Path.cwd()) for _ in range(5))
    ours = whole - start
    print(f"  as a command, aperio: `wsi-mil tile` {whole:.3f} s, interpreter + imports alone {start:.3f} s: "
          f"{ours:.3f} s beyond start-up (a cold process: libraries the stage imports lazily, first "
          f"allocations; medians of 5)")
    clam = _clam_tiler(cache, path, opts.clam)
    if clam is None:  # a figure from another machine and slide is a reference, never divided into a ratio
        print("  reference (not measured here; pass --clam CLAM_CHECKOUT to time it): ~4.5 s was reported for "
              "CLAM's create_patches_fp.py on a slide of this size; no ratio is claimed")
    else:
        print(f"  CLAM create_patches_fp.py --seg --patch --stitch, same slide, same grid (512 px at level 0), "
              f"same run: {clam:.3f} s beyond its start-up: ratio CLAM / wsi-mil {clam / ours:.1f}x")


def _clam_tiler(cache: Path, slide: Path, checkout: str) -> float | None:
    """CLAM's tiler on ``slide`` as a command, seconds beyond its own interpreter + imports (median of 3), or
    None when no runnable CLAM checkout was given. Never vendored: the user points at their own checkout."""
    import shutil
    import subprocess

    if not checkout:
        return None
    root = Path(checkout).resolve()
    imports = [sys.executable, "-c", "import wsi_core.WholeSlideImage, wsi_core.wsi_utils, "
               "wsi_core.batch_process_utils, pandas"]
    if not (root / "create_patches_fp.py").is_file() or subprocess.run(imports, cwd=root, capture_output=True).returncode:
        print(f"  CLAM: {root} is not a runnable checkout here (create_patches_fp.py and its imports, e.g. "
              f"pandas); not timed")
        return None
    src, out = (cache / "clam_src").resolve(), (cache / "clam_out").resolve()
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    (src / slide.name).symlink_to(slide.resolve())
    cmd = [sys.executable, "create_patches_fp.py", "--source", str(src), "--save_dir", str(out), "--patch_size",
           "512", "--step_size", "512", "--seg", "--patch", "--stitch"]

    def run_clam():
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=root, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t0

    whole = statistics.median(run_clam() for _ in range(3))
    start = statistics.median(wall_in(imports, root) for _ in range(3))
    return whole - start
