"""Stage 4: attention heatmaps from cached features -> ``heatmaps/<run_name>/<slide_id>/``.

Per slide: the model's outputs go through :func:`wsi_mil.heatmap.scoring.map_slide` (percentiles, refined
grid, raster); then scores.h5, every export in ``heatmap.exports`` (see :mod:`wsi_mil.heatmap.export`), and
summary.json last: its existence, naming the current model's ``model_id``, marks the slide done. A slide
mapped with another model is redone. The folder is built under a temp name and swapped in whole.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch

from ..atomic import atomic_path
from ..config import Config, config_to_dict
from ..device import cpu_precision, pick_device
from ..errors import ConfigError, WsiMilError
from ..formats import PatchSpec, TissueMask, feature_fingerprint, read_bag, read_tissue_mask, write_scores
from ..heatmap import export
from ..heatmap.raster import colorize
from ..heatmap.scoring import BagScores, SlideMap, map_slide
from ..layout import Layout, encoder_id
from ..mil.checkpoint import check_compatible
from ..mil.data import bag_cells, side_by_side
from ..mil.ensemble import Ensemble, model_path, resolve_model
from ..mil.patients import group_slides, patient_map
from ..mil.tasks.base import MapView
from ..runner import per_process
from ..slide import SlideRef
from .base import SlideStage, current, open_configured

Model = str | Path | None  # a run name, a run folder or a checkpoint; None: heatmap.run, else train.run_name


def model_ref(cfg: Config, model: Model = None) -> str | Path:
    return model if model is not None else (cfg.heatmap.run or cfg.train.run_name)


def run_name(cfg: Config, model: Model = None) -> str:
    """The folder name under heatmaps/: the run's name, or a checkpoint's file name without .safetensors."""
    return Path(model_ref(cfg, model)).name.removesuffix(".safetensors")


def _stamp(path: Path) -> str:
    """What changes when a run or checkpoint is rewritten (names, sizes, mtimes), without hashing it."""
    try:
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        return str([(str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for f in files])
    except OSError:
        return "missing"


def ensemble(layout: Layout, cfg: Config, model: Model = None) -> Ensemble:
    """The model's fold models (resolved by :func:`resolve_model`: complete, fold hashes checked), loaded
    once per process and again when its files change."""
    ref = model_ref(cfg, model)
    device = pick_device(cfg.train.device)
    return per_process("ensemble", _stamp(model_path(layout, ref)) + str(device),
                       lambda: Ensemble(resolve_model(layout, ref), device))


def summary_path(layout: Layout, slide_id: str, cfg: Config, model: Model = None) -> Path:
    return layout.heatmap_summary(run_name(cfg, model), slide_id)


def _load_features(layout: Layout, slide_id: str, ens: Ensemble):
    path = layout.features(ens.meta.encoder_id, slide_id)
    if not path.is_file():
        raise WsiMilError(f"{slide_id}: no {path.relative_to(layout.root)}; run 'wsi-mil extract' first")
    feats, coords, spec = read_bag(path, with_coords=True)
    check_compatible(ens.meta, int(feats.shape[1]), ens.meta.encoder_id, path.name)
    return torch.from_numpy(feats), coords, spec, bag_cells(path)


def _features_and_cells(layout: Layout, slide_id: str, ens: Ensemble) -> tuple[torch.Tensor, torch.Tensor]:
    feats, _, _, cells = _load_features(layout, slide_id, ens)
    return feats, cells


@dataclass(frozen=True)
class SlideBag:
    """The bag a slide's map comes from: the slide itself, or (patient-level runs) its patient's slides
    read one after the other; ``part`` is this slide's rows of it."""

    features: torch.Tensor
    coords: np.ndarray
    spec: PatchSpec
    part: slice
    cells: torch.Tensor  # grid cells of the whole bag (a patient's slides side by side)
    patient_id: str | None = None
    slides: tuple[str, ...] = ()


def bag_members(layout: Layout, cfg: Config, slide_id: str, ens: Ensemble) -> tuple[str | None, list[str]]:
    """The patient and the slides, in bag order, of the bag a slide's map comes from: for a patient-level
    run, the patient's slides that have features now; else (None, [the slide])."""
    patients = patient_map(ens.meta, cfg.train.labels)
    if patients is None:
        return None, [slide_id]
    pid = patients.get(slide_id, slide_id)
    have = [s for s, p in patients.items() if p == pid and layout.features(ens.meta.encoder_id, s).is_file()]
    return pid, group_slides([*have, slide_id] if slide_id not in have else have, patients)[pid]


def _slide_bag(layout: Layout, cfg: Config, slide_id: str, ens: Ensemble) -> SlideBag:
    feats, coords, spec, cells = _load_features(layout, slide_id, ens)
    pid, members = bag_members(layout, cfg, slide_id, ens)
    if pid is None:
        return SlideBag(feats, coords, spec, slice(0, len(coords)), cells)
    parts = [(feats, cells) if s == slide_id else _features_and_cells(layout, s, ens) for s in members]
    start = sum(len(f) for f, _ in parts[:members.index(slide_id)])
    return SlideBag(torch.cat([f for f, _ in parts]), coords, spec, slice(start, start + len(coords)),
                    side_by_side([c for _, c in parts]), pid, tuple(members))


def _bag_scores(ens: Ensemble, bag: SlideBag, precision: str):
    """The bag's prediction as the task shows it, and this slide's part of its instance scores."""
    output, scores = ens(bag.features, precision, bag.cells)
    view = ens.task.map_view(output)
    att, rows = view.pick(scores), view.rows(scores)
    whole = bag.part != slice(0, len(bag.features))
    return view, BagScores(view.maps or [view.mapped], view.mapped, att[bag.part],
                           None if rows is None else rows[:, bag.part], view.values,
                           att if whole else None, rows if whole else None)


def _tissue_mask(layout: Layout, slide_id: str, spec: PatchSpec) -> TissueMask | None:
    """The full-resolution tissue mask from the patch file (older files: the mask PNG)."""
    path = layout.patches(slide_id)
    mask = read_tissue_mask(path) if path.is_file() else None
    if mask is not None:
        return mask
    png = cv2.imread(str(layout.mask(slide_id, "mask.png")), cv2.IMREAD_GRAYSCALE)
    return None if png is None else TissueMask(png > 127, spec.tissue_mpp, spec.level0_width / png.shape[1])


def _refine_scorer(slide: SlideRef, cfg: Config, ens: Ensemble, spec: PatchSpec, precision: str, view: MapView):
    """Instance scores of new patches: extracted with the model's encoder (only the new ones), scored by the
    same ensemble at the base grid's precision, picked as the overlay's (the mapped class's row for
    per-class heads)."""
    from ..features.dataset import patch_dataset
    from ..features.engine import extract_patches, prepared_encoder

    if encoder_id(cfg.encoder.name) != ens.meta.encoder_id:
        raise WsiMilError(f"heatmap.refine needs encoder.name matching the model's encoder '{ens.meta.encoder_id}'")

    def score(new: np.ndarray) -> np.ndarray:
        prep = prepared_encoder(cfg.encoder, cfg.extract)
        feats, _ = extract_patches(prep, patch_dataset(slide.path, new, spec, prep.encoder.geometry,
                                                       cfg.extract.read_group), cfg.extract)
        step = spec.patch_size_level0 * (1 - cfg.heatmap.refine_overlap)  # the denser grid's cells
        _, scores = ens(torch.from_numpy(feats), precision, torch.from_numpy(np.rint(new / step).astype(np.int64)))
        return view.pick(scores)

    return score


def heatmap_slide(slide: SlideRef, cfg: Config, layout: Layout, model: Model = None) -> str:
    """Map one slide. Its folder is built whole under a temp name and swapped in: a slide that fails (or a
    killed run) leaves the previous folder or none, never a partial one the viewer would offer."""
    ens = ensemble(layout, cfg, model)
    bag = _slide_bag(layout, cfg, slide.slide_id, ens)
    ident = {"slide_id": slide.slide_id, "run": run_name(cfg, model), "model_id": ens.model_id}
    made_from = {"features_fingerprint": bag_fingerprint(layout, ens, bag.slides or [slide.slide_id])}
    with atomic_path(layout.heatmap_dir(run_name(cfg, model), slide.slide_id)) as folder:
        folder.mkdir()
        if len(bag.coords) == 0:  # glass only: there is nothing to map (nor, for a slide bag, to predict)
            export.summary_json(folder / "summary.json", {
                **ident, "task": ens.task.name, "prediction": None, "n_patches": 0,
                "note": "0 patches (no tissue): nothing to map", **made_from})
            return "0 patches: nothing to map"
        precision = cpu_precision(cfg.heatmap.precision)
        view, scores = _bag_scores(ens, bag, precision)
        refine = _refine_scorer(slide, cfg, ens, bag.spec, precision, view) if cfg.heatmap.refine else None
        result = map_slide(ident, scores, bag.coords, bag.spec, _tissue_mask(layout, slide.slide_id, bag.spec),
                           cfg.heatmap, refine)
        write_scores(folder / "scores.h5", result.scores)
        extra = _exports(slide, cfg, folder, result, _title(slide.slide_id, view, bag))
        summary = _summary(ident, cfg, ens, view, bag, result, precision, extra)
        export.summary_json(folder / "summary.json", {**summary, **made_from})
    return f"{view.text}, {len(bag.coords)} patches"


def _title(slide_id: str, view: MapView, bag: SlideBag) -> str:
    patient = f"  patient {bag.patient_id} ({len(bag.slides)} slides)" if bag.patient_id is not None else ""
    return f"{slide_id}{patient}  {view.text}"


def _exports(slide: SlideRef, cfg: Config, folder: Path, result: SlideMap, title: str) -> dict:
    h, s = cfg.heatmap, result.scores
    extra: dict = {}
    with open_configured(slide, cfg) as reader, ThreadPoolExecutor(2) as pool:
        job = export.ExportJob(
            folder=folder, slide_id=slide.slide_id, reader=reader, raster=result.raster,
            colour=colorize(result.raster, h.cmap), raster_mpp=s.spec.slide_mpp * result.raster_downsample,
            coords=s.coords, size0=s.spec.patch_size_level0, patch_level=s.spec.patch_level,
            patch_size_level=s.spec.patch_size_level, measurements=result.measurements, percentile=s.percentile,
            title=title, cmap=h.cmap, alpha=h.alpha, top_k=h.top_k)
        # exports are independent and mostly encode outside the GIL: two threads overlap them
        for done in [f.result() for f in [pool.submit(export.EXPORTS[name], job) for name in h.exports]]:
            extra.update(done or {})
    return extra


def _summary(ident: dict, cfg: Config, ens: Ensemble, view: MapView, bag: SlideBag, result: SlideMap,
             precision: str, extra: dict) -> dict:
    """summary.json: the task's prediction (``prediction``: the class, top target, or rounded risk or
    value; ``outputs``: the task's columns; ``probabilities`` for classification and multi-label), the
    bag (a patient's slides), the map and the exports."""
    spec, ds = result.scores.spec, result.raster_downsample
    probs = {k[5:]: v for k, v in view.values.items() if k.startswith("prob_")}
    return {
        **ident, "task": ens.task.name, "prediction": view.label, "outputs": view.values, "probabilities": probs,
        "title": view.text, "bag_level": "patient" if bag.patient_id is not None else "slide",
        "patient_id": bag.patient_id, "bag_slides": list(bag.slides) or [ident["slide_id"]],
        "n_bag_patches": len(bag.features),
        "model": ens.meta.model["name"], "n_models": len(ens.models), "mapped_class": view.mapped,
        "maps": list(view.maps), "per_class_maps": result.scores.class_percentile is not None,
        "encoder_id": ens.meta.encoder_id, "n_patches": len(result.scores.coords),
        "n_refined_patches": result.n_refined, "raster_mpp": spec.slide_mpp * ds, "raster_downsample": ds,
        "raster_shape": list(result.raster.shape), "precision": precision, "heatmap": config_to_dict(cfg.heatmap),
        **extra,
    }


def check_exports(cfg: Config) -> None:
    unknown = [e for e in cfg.heatmap.exports if e not in export.EXPORTS]
    if unknown:
        raise ConfigError(f"config error: heatmap.exports: unknown export {unknown[0]!r} "
                          f"(choose from {', '.join(sorted(export.EXPORTS))})")


def setup(cfg: Config, layout: Layout, model: Model = None) -> None:
    check_exports(cfg)
    ensemble(layout, cfg, model)


def bag_fingerprint(layout: Layout, ens: Ensemble, slides) -> str:
    """The features a map was made from: the digests of its bag's slides' features files, in bag order."""
    return ",".join(feature_fingerprint(layout.features(ens.meta.encoder_id, s)) for s in slides)


def stale_reason(summary: dict, layout: Layout, cfg: Config, model: Model = None) -> str:
    """Why a slide's finished map is not the one this run would make ('' if it is): another model, other
    ``heatmap`` settings, features made again since (a slide tiled or extracted anew), or, for a
    patient-level run, a patient's bag that has gained or lost a slide."""
    ens = ensemble(layout, cfg, model)
    if summary.get("model_id") != ens.model_id:
        return "made by another model"
    now = config_to_dict(cfg.heatmap)
    changed = sorted(k for k, v in (summary.get("heatmap") or {}).items() if now.get(k) != v)
    if changed:
        return f"heatmap.{changed[0]} is now {now.get(changed[0])!r}"
    made = summary.get("features_fingerprint")
    if made is None:  # a map made before fingerprints were recorded
        return ""
    _, members = bag_members(layout, cfg, summary["slide_id"], ens)
    if members != (summary.get("bag_slides") or [summary["slide_id"]]):
        return f"its patient's bag is now {len(members)} slide(s): {', '.join(members)}"
    if made != bag_fingerprint(layout, ens, members):
        return "its features were made again since"
    return ""


def _complete(path: Path, cfg: Config, model: Model = None) -> bool:
    """Done only if its summary parses and is current (:func:`stale_reason`); else redone, the reason in
    the manifest."""
    summary = json.loads(path.read_text())
    return current(stale_reason(summary, Layout(path.parents[3]), cfg, model))  # heatmaps/<run>/<slide>/summary.json


def _folders(layout: Layout, cfg: Config, model: Model = None) -> list[Path]:
    return [layout.heatmaps_dir(run_name(cfg, model))]


def heatmap_stage(model: Model = None) -> SlideStage:
    """The heatmap stage for ``model`` (``wsi-mil run --model``); None maps with ``heatmap.run``, else
    ``train.run_name``. Every part is a partial of a module function, so process and Dask executors can
    send it to their workers."""
    return SlideStage(
        name="heatmap",
        process=partial(heatmap_slide, model=model),
        output=partial(summary_path, model=model),
        folders=partial(_folders, model=model),
        complete=partial(_complete, model=model),
        setup=partial(setup, model=model),
    )


STAGE = heatmap_stage()
