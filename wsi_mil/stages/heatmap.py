"""Stage 4: attention heatmaps from cached features -> ``heatmaps/<run_name>/<slide_id>/``.

Per slide: scores.h5 (per-patch attention logits, softmax attention, percentiles), overlay.png,
heatmap.tiff (pyramidal, with mpp), patches.geojson (QuPath detections), scores.zarr (OME-NGFF 0.4),
top_k/ patches, and summary.json (written last: its existence marks the slide done).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

from ..config import Config, config_to_dict
from ..errors import WsiMilError
from ..h5io import read_coords, write_h5
from ..heatmap import export
from ..heatmap.raster import clip_to_tissue, colorize, raster_downsample, score_raster, smooth
from ..heatmap.scores import percentile_rank, softmax
from ..mil.checkpoint import check_compatible
from ..mil.data import load_features
from ..slide import SlideRef
from .base import SlideStage, open_configured, per_process
from .predict import Ensemble, native_bf16


def run_path(out: Path, cfg: Config) -> Path:
    """``heatmap.run`` as a run name under ``models/``, or a path to a run folder or checkpoint."""
    run = cfg.heatmap.run or cfg.train.run_name
    return Path(run) if ("/" in run or Path(run).suffix == ".safetensors") else Path(out) / "models" / run


def run_name(cfg: Config) -> str:
    return Path(cfg.heatmap.run or cfg.train.run_name).stem


def ensemble(out: Path, cfg: Config) -> Ensemble:
    """The run's fold models, loaded once per process (reloaded if the checkpoints change)."""
    from .predict import checkpoint_files

    path = run_path(out, cfg)
    key = str([(str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for f in checkpoint_files(path)])
    return per_process("ensemble", key, lambda: Ensemble(path))


def slide_dir(out: Path, slide_id: str, cfg: Config) -> Path:
    return Path(out) / "heatmaps" / run_name(cfg) / slide_id


def summary_path(out: Path, slide_id: str, cfg: Config) -> Path:
    return slide_dir(out, slide_id, cfg) / "summary.json"


def _load_features(out: Path, slide_id: str, ens: Ensemble):
    path = Path(out) / "features" / ens.meta.encoder_id / f"{slide_id}.h5"
    if not path.is_file():
        raise WsiMilError(f"{slide_id}: no {path.relative_to(out)}; run 'wsi-mil extract' first")
    feats = load_features(path)
    coords, attrs = read_coords(path)
    check_compatible(ens.meta, int(feats.shape[1]), ens.meta.encoder_id, path.name)
    return feats, coords, attrs


def _tissue_mask(out: Path, slide_id: str) -> np.ndarray | None:
    mask = cv2.imread(str(Path(out) / "masks" / f"{slide_id}.mask.png"), cv2.IMREAD_GRAYSCALE)
    return None if mask is None else mask > 127


def refine(slide: SlideRef, cfg: Config, ens: Ensemble, coords: np.ndarray, attrs: dict, base_scores: np.ndarray,
           mask: np.ndarray | None, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """Extra patches on a denser grid (only the new ones are extracted, with the same encoder), scored by the
    attention branch alone, as percentiles against the base grid's scores."""
    from ..features.encoders import encoder_id
    from ..features.engine import extract_patches
    from ..tiling import box_fractions, grid_axes
    from .extract import patch_dataset, prepared

    if encoder_id(cfg.encoder.name) != ens.meta.encoder_id:
        raise WsiMilError(f"heatmap.refine needs encoder.name matching the model's encoder '{ens.meta.encoder_id}'")
    size0 = float(attrs["patch_size_level0"])
    xs, ys = grid_axes(int(attrs["level0_width"]), int(attrs["level0_height"]), size0,
                       size0 * (1 - cfg.heatmap.refine_overlap))
    gx, gy = np.meshgrid(xs, ys)
    dense = np.stack([gx.ravel(), gy.ravel()], 1)
    if mask is not None:
        scale = attrs["level0_width"] / mask.shape[1]
        frac = box_fractions(mask, scale, dense[:, 0], dense[:, 1], size0)
        dense = dense[frac >= max(float(attrs.get("min_tissue_fraction", 0.25)), 1e-9)]
    known = {tuple(c) for c in coords.tolist()}
    new = np.array([c for c in dense.tolist() if tuple(c) not in known], np.int64).reshape(-1, 2)
    if len(new) == 0:
        return new, np.zeros(0)
    prep = prepared(cfg)
    feats, _ = extract_patches(prep, patch_dataset(slide.path, new, attrs, prep.encoder.input_size,
                                                   cfg.extract.read_group), cfg.extract)
    _, att = ens(torch.from_numpy(feats), precision)  # same precision as the base grid it is ranked against
    return new, percentile_rank(att, base_scores)


def heatmap_slide(slide: SlideRef, cfg: Config, out: Path) -> str:
    h = cfg.heatmap
    ens = ensemble(out, cfg)
    feats, coords, attrs = _load_features(out, slide.slide_id, ens)
    precision = h.precision if h.precision != "auto" else ("bf16" if native_bf16() else "fp32")
    probs, att = ens(feats, precision)
    if len(coords) == 0:  # glass only: a prediction on the empty bag is all there is
        export.summary_json(summary_path(out, slide.slide_id, cfg), {
            "slide_id": slide.slide_id, "prediction": None, "n_patches": 0, "run": run_name(cfg),
            "note": "0 patches (no tissue): nothing to map"})
        return "0 patches: nothing to map"
    attention = softmax(att)
    pct = percentile_rank(att)
    pred = ens.classes[int(np.argmax(probs))]
    folder = slide_dir(out, slide.slide_id, cfg)
    mask = _tissue_mask(out, slide.slide_id)
    size0 = float(attrs["patch_size_level0"])
    all_coords, all_pct = coords, pct
    if h.refine:
        new, new_pct = refine(slide, cfg, ens, coords, attrs, att, mask, precision)
        all_coords, all_pct = np.concatenate([coords, new]), np.concatenate([pct, new_pct])
    w0, h0 = int(attrs["level0_width"]), int(attrs["level0_height"])
    slide_mpp = float(attrs["slide_mpp"])
    ds = raster_downsample(slide_mpp, h.mpp, h.downsample)
    raster = score_raster(all_coords, all_pct / 100.0, size0, w0, h0, ds)
    raster = smooth(clip_to_tissue(raster, mask), h.smooth_sigma_um / (slide_mpp * ds))
    write_h5(folder / "scores.h5",
             {"coords": coords, "attention_logits": att.astype(np.float32), "attention": attention.astype(np.float32),
              "attention_percentile": pct.astype(np.float32)},
             {"coords": attrs, "/": {"slide_id": slide.slide_id, "run": run_name(cfg)}})
    colour = colorize(raster, h.cmap)
    top: list[dict] = []
    with open_configured(slide, cfg) as reader, ThreadPoolExecutor(2) as pool:
        # exports are independent and mostly encode outside the GIL: two threads overlap them
        jobs = []
        if "png" in h.exports:
            def overlay():
                thumb, _ = reader.read_at_mpp(slide_mpp * ds)
                title = f"{slide.slide_id}  pred: {pred} ({probs.max():.2f})"
                export.overlay_png(folder / "overlay.png", thumb, raster, colour, h.cmap, h.alpha, title)
            jobs.append(pool.submit(overlay))
        if "patches" in h.exports:
            jobs.append(pool.submit(export.extreme_patches, folder / "top_k", reader, coords, pct,
                                    int(attrs["patch_level"]), int(attrs["patch_size_level"]), h.top_k))
        if "tiff" in h.exports:
            jobs.append(pool.submit(export.heatmap_tiff, folder / "heatmap.tiff", colour, slide_mpp * ds,
                                    slide.slide_id))
        if "geojson" in h.exports:
            measurements = {"attention": att, "attention_percentile": pct}
            measurements.update({f"prob_{c}": np.full(len(coords), p) for c, p in zip(ens.classes, probs)})
            jobs.append(pool.submit(export.geojson, folder / "patches.geojson", coords, int(round(size0)),
                                    measurements))
        if "zarr" in h.exports:
            jobs.append(pool.submit(export.ome_zarr, folder / "scores.zarr", raster, slide_mpp * ds, slide.slide_id))
        for job in jobs:
            result = job.result()  # re-raises an export's error
            if isinstance(result, list):
                top = result
    export.summary_json(summary_path(out, slide.slide_id, cfg), {
        "slide_id": slide.slide_id, "prediction": pred,
        "probabilities": dict(zip(ens.classes, map(float, probs))),
        "run": run_name(cfg), "model": ens.meta.model["name"], "n_models": len(ens.models),
        "encoder_id": ens.meta.encoder_id, "n_patches": int(len(coords)),
        "n_refined_patches": int(len(all_coords) - len(coords)), "raster_mpp": slide_mpp * ds,
        "raster_downsample": ds, "raster_shape": list(raster.shape), "precision": precision,
        "heatmap": config_to_dict(h),
        "top_k": top,
    })
    return f"{pred} ({probs.max():.2f}), {len(coords)} patches"


STAGE = SlideStage(
    name="heatmap",
    process=heatmap_slide,
    output=summary_path,
    folders=lambda out, cfg: [Path(out) / "heatmaps" / run_name(cfg)],
    setup=lambda cfg, out: ensemble(out, cfg),
)
