"""`make bench`: throughput figures, measured inside this process (no interpreter start-up).

Sections (``--only tile,extract,train,heatmap``); each prints its figures and ratios taken in one run.
Large synthetic inputs are generated once and cached under ``--cache`` (default ``.bench/``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

SECTIONS = ["tile", "extract", "train", "heatmap"]


def timed(fn, repeat: int = 3):
    """Median wall seconds of ``repeat`` calls (after one warm-up call), and the last result."""
    result = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def big_slide(cache: Path, width: int, height: int, mpp: float) -> Path:
    from wsi_mil.synthetic import SyntheticSpec, write_slide

    path = cache / f"big_{width}x{height}_{mpp}.svs"
    if not path.exists():
        print(f"  generating {path.name} once (cached for later runs) ...", flush=True)
        t0 = time.perf_counter()
        write_slide(path, SyntheticSpec(width=width, height=height, mpp=mpp, tumour=True, seed=7), cache / "truth")
        print(f"  generated in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def bench_tile(cache: Path, quick: bool) -> None:
    import cv2

    from wsi_mil.config import load_config
    from wsi_mil.slide import open_slide
    from wsi_mil.stages.tile import compute_tiles
    from wsi_mil.synthetic import load_truth

    w, h = (20000, 16000) if quick else (100_000, 80_000)
    print(f"\n== tile: mask + tile a synthetic {w}x{h} slide at 0.25 µm/px, 256-px patches at 0.25 µm/px")
    path = big_slide(cache, w, h, 0.25)
    cfg = load_config(None, ["tiling.target_mpp=0.25", "tiling.patch_size=256"])

    def run():
        with open_slide(path, cfg.slides) as reader:
            return compute_tiles(reader, cfg, path.stem)

    seconds, res = timed(run)
    truth, _ = load_truth(cache / "truth", path.stem, "tissue")
    mask = cv2.resize(res.mask.astype(np.uint8), truth.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    iou = (mask & truth).sum() / max(1, (mask | truth).sum())
    recall = (mask & truth).sum() / max(1, truth.sum())
    print(f"  patches kept          : {len(res.grid.coords):,} of {res.grid.shape[0] * res.grid.shape[1]:,}")
    print(f"  mask + tile seconds   : {seconds:.3f} s (median of 3, in-process)")
    print(f"  tissue IoU vs truth   : {iou:.3f}  (recall {recall:.3f})")
    print(f"  vs reference pipeline : {4.5 / seconds:.1f}x faster than the ~4.5 s reported for it")


def _bench_patches(cache: Path, n: int):
    """A cached synthetic slide, tiled, and the first ``n`` patch coordinates."""
    from wsi_mil.config import load_config
    from wsi_mil.h5io import read_coords
    from wsi_mil.slide import SlideRef
    from wsi_mil.stages.tile import tile_slide
    from wsi_mil.synthetic import SyntheticSpec, write_slide

    path = cache / "extract_8192x6144_0.5.svs"
    if not path.exists():
        write_slide(path, SyntheticSpec(width=8192, height=6144, mpp=0.5, tumour=True, seed=9))
    patches = cache / "extract_out" / "patches" / f"{path.stem}.h5"
    if not patches.exists():
        tile_slide(SlideRef(path.stem, path), load_config(), cache / "extract_out")
    coords, attrs = read_coords(patches)
    return path, coords[:n], attrs


def naive_extract(path: Path, coords, attrs, model, batch: int) -> float:
    """The common baseline: one read_region per patch, PIL + torchvision transforms, batch forward."""
    import openslide
    import torch
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize(224), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    size = int(attrs["patch_size_level"])
    t0 = time.perf_counter()
    with openslide.OpenSlide(str(path)) as slide, torch.inference_mode():
        for i in range(0, len(coords), batch):
            imgs = [tf(slide.read_region(tuple(int(v) for v in c), int(attrs["patch_level"]), (size, size))
                       .convert("RGB")) for c in coords[i:i + batch]]
            model(torch.stack(imgs))
    return len(coords) / (time.perf_counter() - t0)


def bench_extract(cache: Path, quick: bool) -> None:
    import torch

    from wsi_mil.config import load_config
    from wsi_mil.features.engine import extract_patches
    from wsi_mil.stages.extract import patch_dataset, prepared

    n = 64 if quick else 256
    path, coords, attrs = _bench_patches(cache, n)
    batch = 32
    print(f"\n== extract: resnet50_trunc (random init), 224 px, batch {batch}, {len(coords)} patches, "
          f"{torch.get_num_threads()} threads")
    for prec in ("fp32", "bf16"):
        cfg = load_config(None, ["encoder.pretrained=false", f"extract.precision={prec}",
                                 f"extract.batch_size={batch}"])
        prep = prepared(cfg)
        imgs = patch_dataset(path, coords, attrs, 224, 8).__getitems__(list(range(len(coords))))["image"]

        def pure(prep=prep, imgs=imgs):
            with torch.inference_mode():
                for i in range(0, len(imgs), batch):
                    prep.forward_uint8(imgs[i:i + batch])

        sec_a, _ = timed(pure, repeat=1)
        a = len(coords) / sec_a
        ds = patch_dataset(path, coords, attrs, prep.encoder.input_size, cfg.extract.read_group)
        sec_b, _ = timed(partial(extract_patches, prep, ds, cfg.extract), repeat=1)
        b = len(coords) / sec_b
        print(f"  {prec}: (a) pure forward {a:6.1f} patches/s | (b) full extraction {b:6.1f} patches/s | "
              f"b/a = {b / a:.2f}")
        if prec == "fp32":
            model = prep.encoder.model.to(memory_format=torch.contiguous_format)
            naive = naive_extract(path, coords, attrs, model, batch)
            prep.encoder.model.to(memory_format=torch.channels_last)
            print(f"  fp32 naive loop (read_region per patch, PIL transforms): {naive:6.1f} patches/s | "
                  f"ours / naive = {b / naive:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument("--cache", type=Path, default=Path(".bench"))
    ap.add_argument("--quick", action="store_true", help="smaller inputs (for a smoke run)")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    for name in args.only.split(","):
        if name not in SECTIONS:
            print(f"error: unknown section '{name}' (choose from {', '.join(SECTIONS)})", file=sys.stderr)
            return 2
        fn = globals().get(f"bench_{name}")
        if fn is None:
            print(f"\n== {name}: not implemented yet")
            continue
        fn(args.cache, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
