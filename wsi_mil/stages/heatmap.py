"""Stage 4: attention heatmaps from cached features -> ``heatmaps/<run_name>/<slide_id>/``.

Per slide: scores.h5 (per-patch attention logits, softmax attention, percentiles), then every export in
``heatmap.exports`` (see :mod:`wsi_mil.heatmap.export`), and summary.json last: its existence, naming the
current model's ``model_id``, marks the slide done. A slide mapped with another model is redone.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

from ..atomic import atomic_path
from ..config import Config, config_to_dict
from ..device import cpu_precision, pick_device
from ..errors import ConfigError, WsiMilError
from ..h5io import read_coords, write_h5
from ..heatmap import export
from ..heatmap.raster import clip_to_tissue, colorize, raster_downsample, score_raster, smooth
from ..heatmap.scores import percentile_rank, softmax
from ..layout import Layout, encoder_id
from ..mil.checkpoint import check_compatible
from ..mil.data import load_features
from ..mil.ensemble import Ensemble, resolve_model
from ..runner import per_process
from ..slide import SlideRef
from .base import SlideStage, open_configured


def run_name(cfg: Config) -> str:
    """The folder name under heatmaps/: the run's name, or a checkpoint's file name without .safetensors."""
    return Path(cfg.heatmap.run or cfg.train.run_name).name.removesuffix(".safetensors")


def _stamp(path: Path) -> str:
    """What changes when a run or checkpoint is rewritten (names, sizes, mtimes), without hashing it."""
    try:
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        return str([(str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for f in files])
    except OSError:
        return "missing"


def ensemble(layout: Layout, cfg: Config) -> Ensemble:
    """The run's fold models (``heatmap.run`` or ``train.run_name``, resolved by :func:`resolve_model`),
    loaded once per process and again when the model's files change."""
    ref = cfg.heatmap.run or cfg.train.run_name
    where = ref if ("/" in ref or ref.endswith(".safetensors")) else str(layout.run_dir(ref))
    device = pick_device(cfg.train.device)
    return per_process("ensemble", _stamp(Path(where)) + str(device),
                       lambda: Ensemble(resolve_model(layout, ref), device))


def summary_path(layout: Layout, slide_id: str, cfg: Config) -> Path:
    return layout.heatmap_summary(run_name(cfg), slide_id)


def _load_features(layout: Layout, slide_id: str, ens: Ensemble):
    path = layout.features(ens.meta.encoder_id, slide_id)
    if not path.is_file():
        raise WsiMilError(f"{slide_id}: no {path.relative_to(layout.root)}; run 'wsi-mil extract' first")
    feats = load_features(path)
    coords, attrs = read_coords(path)
    check_compatible(ens.meta, int(feats.shape[1]), ens.meta.encoder_id, path.name)
    return feats, coords, attrs


def _tissue_mask(layout: Layout, slide_id: str) -> np.ndarray | None:
    """The full-resolution tissue mask from the patch file (older files: the mask PNG)."""
    import h5py

    path = layout.patches(slide_id)
    if path.is_file():
        with h5py.File(path, "r") as fh:
            if "tissue_mask" in fh:
                return fh["tissue_mask"][:] > 0
    mask = cv2.imread(str(layout.mask(slide_id, "mask.png")), cv2.IMREAD_GRAYSCALE)
    return None if mask is None else mask > 127


def refine(slide: SlideRef, cfg: Config, ens: Ensemble, coords: np.ndarray, attrs: dict, base_scores: np.ndarray,
           mask: np.ndarray | None, precision: str, class_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Extra patches on a denser grid (only the new ones are extracted, with the same encoder), scored by the
    attention branch alone, as percentiles against the base grid's scores."""
    from ..features.dataset import patch_dataset
    from ..features.engine import extract_patches, prepared_encoder
    from ..tiling import box_fractions, grid_axes

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
    prep = prepared_encoder(cfg.encoder, cfg.extract)
    feats, _ = extract_patches(prep, patch_dataset(slide.path, new, attrs, prep.encoder.input_size,
                                                   cfg.extract.read_group), cfg.extract)
    _, scores = ens(torch.from_numpy(feats), precision)  # same precision as the base grid it is ranked against
    return new, percentile_rank(scores[class_index] if scores.ndim == 2 else scores, base_scores)


def heatmap_slide(slide: SlideRef, cfg: Config, layout: Layout) -> str:
    """Map one slide. Its folder is built whole under a temp name and swapped in: a slide that fails (or a
    killed run) leaves the previous folder or none, never a partial one the viewer would offer."""
    ens = ensemble(layout, cfg)
    feats, coords, attrs = _load_features(layout, slide.slide_id, ens)
    with atomic_path(layout.heatmap_dir(run_name(cfg), slide.slide_id)) as folder:
        folder.mkdir()
        return _map_slide(slide, cfg, ens, feats, coords, attrs, folder, _tissue_mask(layout, slide.slide_id))


def _map_slide(slide: SlideRef, cfg: Config, ens: Ensemble, feats, coords: np.ndarray, attrs: dict, folder: Path,
               mask: np.ndarray | None) -> str:
    h = cfg.heatmap
    base = {"slide_id": slide.slide_id, "run": run_name(cfg), "model_id": ens.model_id}
    if len(coords) == 0:  # glass only: there is nothing to map and no prediction to make
        export.summary_json(folder / "summary.json", {
            **base, "prediction": None, "n_patches": 0, "note": "0 patches (no tissue): nothing to map"})
        return "0 patches: nothing to map"
    precision = cpu_precision(h.precision)
    probs, scores = ens(feats, precision)
    k = int(np.argmax(probs))
    pred = ens.classes[k]
    att = scores[k] if ens.per_class else scores  # per-class heads: the map of the predicted class
    attention = softmax(att)
    pct = percentile_rank(att)
    size0 = float(attrs["patch_size_level0"])
    all_coords, all_pct = coords, pct
    if h.refine:
        new, new_pct = refine(slide, cfg, ens, coords, attrs, att, mask, precision, k)
        all_coords, all_pct = np.concatenate([coords, new]), np.concatenate([pct, new_pct])
    w0, h0 = int(attrs["level0_width"]), int(attrs["level0_height"])
    slide_mpp = float(attrs["slide_mpp"])
    ds = raster_downsample(slide_mpp, h.mpp, h.downsample)
    raster = score_raster(all_coords, all_pct / 100.0, size0, w0, h0, ds)
    raster = smooth(clip_to_tissue(raster, mask), h.smooth_sigma_um / (slide_mpp * ds))
    datasets = {"coords": coords, "attention_logits": att.astype(np.float32), "attention": attention.astype(np.float32),
                "attention_percentile": pct.astype(np.float32)}
    measurements = {"attention": att, "attention_percentile": pct}
    if ens.per_class:  # one map per class: every class's scores and percentiles are kept and exported
        class_pct = np.stack([percentile_rank(s) for s in scores])
        datasets.update({"class_attention_logits": scores.astype(np.float32),
                         "class_attention_percentile": class_pct.astype(np.float32)})
        for c, s_c, p_c in zip(ens.classes, scores, class_pct):
            measurements.update({f"attention_{c}": s_c, f"attention_percentile_{c}": p_c})
    if h.refine:  # the refined patches' scores, so the viewer draws the map the exports drew
        datasets.update({"refined_coords": all_coords[len(coords):],
                         "refined_attention_percentile": all_pct[len(coords):].astype(np.float32)})
    write_h5(folder / "scores.h5", datasets,
             {"coords": attrs, "/": {**base, "classes": json.dumps(ens.classes), "mapped_class": pred}})
    measurements.update({f"prob_{c}": np.full(len(coords), p) for c, p in zip(ens.classes, probs)})
    extra: dict = {}
    with open_configured(slide, cfg) as reader, ThreadPoolExecutor(2) as pool:
        job = export.ExportJob(
            folder=folder, slide_id=slide.slide_id, reader=reader, raster=raster, colour=colorize(raster, h.cmap),
            raster_mpp=slide_mpp * ds, coords=coords, size0=int(round(size0)), patch_level=int(attrs["patch_level"]),
            patch_size_level=int(attrs["patch_size_level"]), measurements=measurements, percentile=pct,
            title=f"{slide.slide_id}  pred: {pred} ({probs.max():.2f})", cmap=h.cmap, alpha=h.alpha, top_k=h.top_k)
        # exports are independent and mostly encode outside the GIL: two threads overlap them
        for result in [f.result() for f in [pool.submit(export.EXPORTS[name], job) for name in h.exports]]:
            extra.update(result or {})
    export.summary_json(folder / "summary.json", {
        **base, "prediction": pred, "probabilities": dict(zip(ens.classes, map(float, probs))),
        "model": ens.meta.model["name"], "n_models": len(ens.models), "mapped_class": pred,
        "per_class_maps": ens.per_class,
        "encoder_id": ens.meta.encoder_id, "n_patches": int(len(coords)),
        "n_refined_patches": int(len(all_coords) - len(coords)), "raster_mpp": slide_mpp * ds,
        "raster_downsample": ds, "raster_shape": list(raster.shape), "precision": precision,
        "heatmap": config_to_dict(h), **extra,
    })
    return f"{pred} ({probs.max():.2f}), {len(coords)} patches"


def check_exports(cfg: Config) -> None:
    unknown = [e for e in cfg.heatmap.exports if e not in export.EXPORTS]
    if unknown:
        raise ConfigError(f"config error: heatmap.exports: unknown export {unknown[0]!r} "
                          f"(choose from {', '.join(sorted(export.EXPORTS))})")


def setup(cfg: Config, layout: Layout) -> None:
    check_exports(cfg)
    ensemble(layout, cfg)


def _complete(path: Path, cfg: Config) -> bool:
    """Done only if its summary parses and names the model the run holds now."""
    summary = json.loads(path.read_text())
    layout = Layout(path.parents[3])  # heatmaps/<run>/<slide>/summary.json
    return summary.get("model_id") == ensemble(layout, cfg).model_id


STAGE = SlideStage(
    name="heatmap",
    process=heatmap_slide,
    output=summary_path,
    folders=lambda layout, cfg: [layout.heatmaps_dir(run_name(cfg))],
    complete=_complete,
    setup=setup,
)
