"""``wsi-mil evaluate``: a trained run (its fold ensemble, or one fold checkpoint) on another cohort ->
``evaluations/<run>/<name>/``.

The cohort's labels are read as the run was trained (its task, label columns, bag level); its features
default to the study's features of the run's encoder. Every bag gets the ensemble's output, as ``predict``
gives it (binary runs call ``pred`` at the run's operating threshold). Each metric of the task comes with
a 95% bootstrap interval over patients (``evaluate.bootstrap`` resamples, ``evaluate.seed``), and the
task's plots are drawn (:mod:`wsi_mil.mil.evaluation`). The folder is built under a temp name and
swapped in whole; ``metrics.json`` is written last.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import atomic_path, write_csv, write_json
from ..config import Config, TrainConfig
from ..device import pick_device
from ..errors import WsiMilError
from ..layout import Layout
from ..mil.data import BagCache, load_bagset, patient_bags
from ..mil.ensemble import Ensemble, resolve_model
from ..mil.evaluation import intervals
from ..mil.patients import bag_level
from ..mil.tasks import task_class


def _cohort(ens: Ensemble, features: Path, labels: Path):
    """The cohort's bags, read the way the run was trained (task columns, classes, bag level)."""
    tcfg = TrainConfig.model_validate(dict((ens.meta.config or {}).get("train") or {}))
    kind = task_class(tcfg.task)
    label_map = ens.meta.label_map if kind.parse_labels(tcfg) is None else None
    data = load_bagset(features, labels, "skip", label_map=label_map, columns=kind.label_columns(tcfg),
                       parse=kind.parse_labels(tcfg))
    if data.encoder_id != ens.meta.encoder_id:
        raise WsiMilError(f"{features}: features of '{data.encoder_id}', but the model was trained on "
                          f"'{ens.meta.encoder_id}' features")
    return patient_bags(data) if bag_level(ens.meta) == "patient" else data


def _outputs(ens: Ensemble, bags: list, progress: bool) -> np.ndarray:
    from tqdm import tqdm

    reader = BagCache(0)  # reads a slide's or a patient's files as one bag; keeps nothing
    return np.stack([ens(reader.get(bag), cells=reader.cells(bag))[0]
                     for bag in tqdm(bags, desc="evaluate", unit="bag", disable=not progress, leave=False)])


def evaluate(layout: Layout, cfg: Config, labels: Path, model: Path | str | None = None,
             features: Path | None = None, name: str | None = None, progress: bool = True) -> tuple[dict, Path]:
    ref = resolve_model(layout, model if model is not None else cfg.train.run_name)
    ens = Ensemble(ref, pick_device(cfg.train.device))
    features = Path(features) if features else layout.features_dir(ens.meta.encoder_id)
    data = _cohort(ens, features, Path(labels))
    bags, task = data.bags, ens.task
    outputs = _outputs(ens, bags, progress)
    groups = np.array([b.patient_id for b in bags])
    e = cfg.evaluate
    metrics = intervals(task.ensemble_metrics(bags, outputs), groups, e.bootstrap, e.seed)
    name = name or Path(labels).stem
    with atomic_path(layout.evaluation_dir(ref.name, name)) as folder:
        folder.mkdir(parents=True)
        rows = [{"slide_id": b.slide_id, "patient_id": b.patient_id, **task.truth(b), **task.ensemble_row(o)}
                for b, o in zip(bags, outputs)]
        write_csv(folder / "predictions.csv", rows)
        plots = task.evaluation_plots(folder, bags, outputs, groups, e.bootstrap, e.seed)
        summary = {"run": ref.name, "model_id": ref.model_id, "task": task.name, "cohort": str(labels),
                   "features": str(features), "n_bags": len(bags), "n_patients": int(len(set(groups))),
                   "bag_level": bag_level(ens.meta), "threshold": getattr(task, "threshold", None),
                   "bootstrap": {"resamples": e.bootstrap, "seed": e.seed, "level": 0.95, "unit": "patient"},
                   "metrics": metrics, **plots,
                   "skipped": {"no_features": data.no_features, "no_patches": data.no_patches}}
        summary = write_json(folder / "metrics.json", summary)  # as written: undefined figures are None
    return summary, layout.evaluation_dir(ref.name, name)


def _figure(v: dict) -> str:
    if v["value"] is None:
        return "undefined"
    return f"{v['value']:.3f} " + ("[no interval]" if v["low"] is None else f"[{v['low']:.3f}, {v['high']:.3f}]")


def summary_line(summary: dict, folder: Path) -> str:
    shown = ", ".join(f"{k} {_figure(v)}" for k, v in summary["metrics"].items() if not k.startswith("auroc_"))
    return (f"evaluate: {summary['run']} on {Path(summary['cohort']).name} ({summary['n_bags']} bags, "
            f"{summary['n_patients']} patients): {shown} -> {folder}")
