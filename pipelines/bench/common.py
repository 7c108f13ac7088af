"""What several bench sections share: timing, cached synthetic slides, a mapped study."""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

# Appended to a child's code: prints its peak RSS as ``PEAK_KB n``. VmHWM is the peak of the process's own
# memory since its exec; ru_maxrss would start from the parent's RSS at fork (Linux keeps it across fork
# and exec), so a child of a big bench process would read as big as its parent.
PEAK_PROBE = ("\nhwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
              "print('PEAK_KB', hwm[0], flush=True)\n")


def pure_pass(model, opt, batches, amp: bool) -> float:
    """Seconds of one pass of forward + loss + backward + optimiser step over ``batches`` of
    (x, mask, y, coords) already in memory, in fit's precision (``amp``) and allocator setting: the
    baseline a training loop is measured against."""
    import torch

    from wsi_mil.mil.train import autocast
    from wsi_mil.runner.memory import heap_for_steps

    model.train()
    t0 = time.perf_counter()
    with heap_for_steps():
        for x, mask, y, coords in batches:
            with autocast(torch.device("cpu"), amp):
                out = model(x, mask, coords)
            loss = model.compute_loss(out, y)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def timed(fn, repeat: int = 3):
    """Median wall seconds of ``repeat`` calls (after one warm-up call), and the last result."""
    result = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def big_slide(cache: Path, width: int, height: int, mpp: float) -> Path:  # the heatmap section's slide
    from wsi_mil.synthetic import SyntheticSpec, write_slide

    path = cache / f"big_{width}x{height}_{mpp}.svs"
    if not path.exists():
        print(f"  generating {path.name} once (cached for later runs) ...", flush=True)
        t0 = time.perf_counter()
        write_slide(path, SyntheticSpec(width=width, height=height, mpp=mpp, tumour=True, seed=7), cache / "truth")
        print(f"  generated in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


PYRAMIDS = {  # name: (level_factor, min_level_size) for write_slide: which levels the file carries
    "aperio 1/4/16/64": (4, 1000),
    "levels 1/4/16": (4, 2000),
    "factor-2": (2, 512),
}


def pyramid_slide(cache: Path, name: str, width: int, height: int) -> Path:
    from wsi_mil.synthetic import SyntheticSpec, write_slide

    factor, min_size = PYRAMIDS[name]
    path = cache / f"pyr_{factor}_{min_size}_{width}x{height}.svs"
    if not path.exists():
        print(f"  generating {path.name} once (cached for later runs) ...", flush=True)
        write_slide(path, SyntheticSpec(width=width, height=height, mpp=0.25, tumour=True, seed=7,
                                        level_factor=factor, min_level_size=min_size), cache / "truth")
    return path


def wall_in(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def mapped_study(cache: Path, path: Path, out_name: str):
    """``path`` tiled at 224 px / 0.25 µm/px with random 1024-d features and a random 5-fold ensemble
    (outputs under cache/out_name, reused): what the heatmap stage and the viewer need. Returns
    (layout, config, coords)."""
    import torch

    from wsi_mil.config import load_config
    from wsi_mil.formats import FeatureSpec, read_patch_file, write_features
    from wsi_mil.layout import Layout
    from wsi_mil.mil.checkpoint import CheckpointMeta, save_checkpoint
    from wsi_mil.mil.ensemble import write_run_summary
    from wsi_mil.mil.models import build_model
    from wsi_mil.slide import SlideRef
    from wsi_mil.stages.tile import tile_slide

    out = Layout(cache / out_name)
    cfg = load_config(None, ["tiling.target_mpp=0.25", "tiling.patch_size=224", "encoder.name=bench_enc",
                             "runner.overwrite=true"])
    if not out.patches(path.stem).exists():
        tile_slide(SlideRef(path.stem, path), cfg, out)
    coords, spec = read_patch_file(out.patches(path.stem))
    feats = out.features("bench_enc", path.stem)
    if not feats.exists():
        rng = np.random.default_rng(0)
        write_features(feats, path.stem, rng.standard_normal((len(coords), 1024), np.float32), coords,
                       FeatureSpec("bench_enc", 1024), spec)
    if not (out.run_dir("default") / "summary.json").exists():
        m = cfg.model
        for fold in range(5):
            torch.manual_seed(fold)
            model = build_model(m, 1024, 2)
            save_checkpoint(out.run_dir("default") / f"fold_{fold}.safetensors", model,
                            CheckpointMeta(m.model_dump(), {"normal": 0, "tumour": 1}, 1024, "bench_enc", fold))
        write_run_summary(out.run_dir("default"), {"fold_files": [f"fold_{k}.safetensors" for k in range(5)]})
    return out, cfg, coords
