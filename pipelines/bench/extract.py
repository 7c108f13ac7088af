"""extract: pure forward vs the whole extraction (read, resize, normalise, forward) vs a naive loop."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from .common import timed
from .options import Options


def _bench_patches(cache: Path, n: int):
    """A cached synthetic slide, tiled, and the first ``n`` patch coordinates."""
    from wsi_mil.config import load_config
    from wsi_mil.formats import read_patch_file
    from wsi_mil.layout import Layout
    from wsi_mil.slide import SlideRef
    from wsi_mil.stages.tile import tile_slide
    from wsi_mil.synthetic import SyntheticSpec, write_slide

    path = cache / "extract_8192x6144_0.5.svs"
    if not path.exists():
        write_slide(path, SyntheticSpec(width=8192, height=6144, mpp=0.5, tumour=True, seed=9))
    layout = Layout(cache / "extract_out")
    patches = layout.patches(path.stem)
    if not patches.exists():
        tile_slide(SlideRef(path.stem, path), load_config(), layout)
    coords, spec = read_patch_file(patches)
    return path, coords[:n], spec


def naive_extract(path: Path, coords, spec, encoder, batch: int) -> float:
    """The common baseline: one read_region per patch, PIL + torchvision transforms, batch forward."""
    import openslide
    import torch
    from torchvision import transforms

    size_in, model = encoder.input_size, encoder.model
    tf = transforms.Compose([transforms.Resize(size_in), transforms.CenterCrop(size_in), transforms.ToTensor(),
                             transforms.Normalize(encoder.mean, encoder.std)])
    size = spec.patch_size_level
    t0 = time.perf_counter()
    with openslide.OpenSlide(str(path)) as slide, torch.inference_mode():
        for i in range(0, len(coords), batch):
            imgs = [tf(slide.read_region(tuple(int(v) for v in c), spec.patch_level, (size, size))
                       .convert("RGB")) for c in coords[i:i + batch]]
            model(torch.stack(imgs))
    return len(coords) / (time.perf_counter() - t0)


def run(opts: Options) -> None:
    cache, quick = opts.cache, opts.quick
    import torch

    from wsi_mil.config import load_config
    from wsi_mil.features.dataset import patch_dataset
    from wsi_mil.features.engine import extract_patches, prepared_encoder

    n = opts.patches or (16 if quick else 256)
    path, coords, spec = _bench_patches(cache, n)
    batch, encoder = opts.batch, opts.encoder
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\n== extract: {encoder} (random init), tiles {spec.patch_size_target} px, batch {batch}, "
          f"{len(coords)} patches, {device}, {torch.get_num_threads()} threads")
    for prec in ("fp32", "bf16"):
        cfg = load_config(None, [f"encoder.name={encoder}", "encoder.pretrained=false", f"extract.precision={prec}",
                                 f"extract.batch_size={batch}"])
        prep = prepared_encoder(cfg.encoder, cfg.extract)
        size_in = prep.encoder.input_size  # the model's own input edge (224; 448 for conch_v15)
        imgs = patch_dataset(path, coords, spec, size_in, 8).__getitems__(list(range(len(coords))))["image"]

        def pure(prep=prep, imgs=imgs):
            with torch.inference_mode():
                for i in range(0, len(imgs), batch):
                    prep.forward_uint8(imgs[i:i + batch])

        sec_a, _ = timed(pure, repeat=1)
        a = len(coords) / sec_a
        ds = patch_dataset(path, coords, spec, prep.encoder.geometry, cfg.extract.read_group)
        sec_b, _ = timed(partial(extract_patches, prep, ds, cfg.extract), repeat=1)
        b = len(coords) / sec_b
        print(f"  {prec}: (a) pure forward {a:6.1f} patches/s | (b) full extraction {b:6.1f} patches/s | "
              f"b/a = {b / a:.2f}")
        if prec == "fp32" and device == "cpu":
            prep.encoder.model.to(memory_format=torch.contiguous_format)
            naive = naive_extract(path, coords, spec, prep.encoder, batch)
            prep.encoder.model.to(memory_format=torch.channels_last)
            print(f"  fp32 naive loop (read_region per patch, PIL transforms): {naive:6.1f} patches/s | "
                  f"ours / naive = {b / naive:.2f}")
