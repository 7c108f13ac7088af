"""Stage 3: cross-validated attention MIL on cached bags -> ``models/<run_name>/``.

Outputs: ``fold_<k>.safetensors`` (weights + metadata), ``splits.csv``, ``predictions.csv`` (out-of-fold
probabilities for every slide), ``history.csv`` + ``curves.png``, ``label_map.json``, ``config.yaml``,
``summary.json`` (per-fold metrics and mean ± std, and the list of fold files).

The run is built in a temp folder next to its final place and swapped in whole once ``summary.json`` is
written, so a killed train leaves the previous run (or none) and never a partial one, and a retrain
with fewer folds leaves no old fold behind.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from ..atomic import atomic_path, clean_stale_temps, file_sha256, write_csv, write_text
from ..config import Config, config_to_dict
from ..device import pick_device
from ..errors import WsiMilError, one_line
from ..layout import Layout, encoder_id
from ..mil.checkpoint import CheckpointMeta, save_checkpoint
from ..mil.data import BagCache, BagSet, load_bagset, patient_bags
from ..mil.ensemble import write_run_summary
from ..mil.metrics import mean_std
from ..mil.models import build_model
from ..mil.splits import fixed_split, kfold_splits
from ..mil.tasks import Task, check_finite, task_class
from ..mil.train import fit, predict_bags


def features_dir(layout: Layout, cfg: Config) -> Path:
    return Path(cfg.train.features) if cfg.train.features else layout.features_dir(encoder_id(cfg.encoder.name))


def _plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for fold in sorted({h["fold"] for h in history}):
        rows = [h for h in history if h["fold"] == fold]
        ax.plot([r["epoch"] for r in rows], [r["train_loss"] for r in rows], "-", label=f"fold {fold} train")
        if any(not math.isnan(r.get("val_loss", math.nan)) for r in rows):
            ax.plot([r["epoch"] for r in rows], [r.get("val_loss", math.nan) for r in rows], "--",
                    label=f"fold {fold} val")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def make_task(data: BagSet, cfg: Config) -> Task:
    return task_class(cfg.train.task)(data.label_map, cfg.train)


def _fold(task: Task, bags: list, idx: tuple, fold: int, data: BagSet, cfg: Config, out_dir: Path, ctx: dict):
    """Fit one fold and save its checkpoint; returns (fold task, fold bags, fit result)."""
    tr, va, _ = idx
    ftask = task.for_fold([bags[i] for i in tr])
    fbags = ftask.fold_bags(bags)
    res = fit([fbags[i] for i in tr], [fbags[i] for i in va], data.feature_dim, len(data.label_map), cfg.model,
              cfg.train, seed=cfg.train.seed + fold, device=ctx["device"], progress=ctx["progress"],
              cache=ctx["cache"], task=ftask)
    meta = CheckpointMeta(config_to_dict(cfg.model), data.label_map, data.feature_dim, data.encoder_id,
                          fold, res.best_epoch, config_to_dict(cfg), ftask.out_dim(), ftask.describe())
    save_checkpoint(out_dir / f"fold_{fold}.safetensors", res.model, meta)
    return ftask, fbags, res


def train_cv(data: BagSet, cfg: Config, out_dir: Path, progress: bool = False, cache: BagCache | None = None) -> dict:
    """Train every fold and write every output into ``out_dir`` (summary.json last); return the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    task, bags, t = make_task(data, cfg), data.bags, cfg.train
    groups = np.array([b.patient_id for b in bags])
    splits = (fixed_split([b.split for b in bags]) if t.split_column
              else kfold_splits(task.strata(bags), groups, t.folds, t.val_fraction, t.seed))
    ctx = {"device": pick_device(t.device), "progress": progress,
           "cache": cache or BagCache.from_config(t, share=max(1, t.num_workers))}
    split_rows, history, fold_metrics, fold_files, fold_sha = [], [], [], [], []
    oof: list[np.ndarray | None] = [None] * len(bags)
    fold_of = np.full(len(bags), -1)
    for fold, idx in enumerate(splits):
        for name, members in zip(("train", "val", "test"), idx):
            split_rows += [{"slide_id": bags[i].slide_id, "patient_id": bags[i].patient_id, **task.truth(bags[i]),
                            "fold": fold, "split": name} for i in members]
        ftask, fbags, res = _fold(task, bags, idx, fold, data, cfg, out_dir, ctx)
        history += [{"fold": fold, **h} for h in res.history]
        fold_files.append(f"fold_{fold}.safetensors")
        fold_sha.append(file_sha256(out_dir / f"fold_{fold}.safetensors"))
        te = idx[2]
        if len(te):
            outputs, _ = predict_bags(res.model, [fbags[i] for i in te], device=ctx["device"], cache=ctx["cache"],
                                      amp=t.amp, task=ftask)
            check_finite(outputs, f"fold {fold}")
            for i, row in zip(te, outputs):
                oof[i], fold_of[i] = row, fold
            fold_metrics.append({"fold": fold, "best_epoch": res.best_epoch, **ftask.describe(),
                                 **ftask.metrics([bags[i] for i in te], outputs, [bags[i] for i in idx[0]])})
    write_csv(out_dir / "splits.csv", split_rows)
    _write_predictions(out_dir, task, bags, oof, fold_of, data)
    plots = task.write_plots(out_dir, bags, oof)
    write_csv(out_dir / "history.csv", history)
    _plot_curves(history, out_dir / "curves.png")
    write_text(out_dir / "label_map.json", json.dumps(data.label_map, indent=1))
    write_text(out_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tested = [i for i, o in enumerate(oof) if o is not None]
    summary = {
        "run": cfg.train.run_name, "model": cfg.model.name, "task": task.name, "main_metric": task.main_metric,
        "fold_files": fold_files, "fold_sha256": fold_sha, "encoder_id": data.encoder_id,
        "feature_dim": data.feature_dim, **_classes(task), "bag_level": t.bag_level, "n_bags": len(bags),
        "n_slides": sum(max(1, len(b.slides)) for b in bags), "n_folds": len(splits),
        "folds": fold_metrics,
        "mean_std": mean_std(fold_metrics, task.fold_keys) if fold_metrics else {},
        "pooled_out_of_fold": {**(task.pooled_metrics([bags[i] for i in tested], [oof[i] for i in tested], bags)
                                  if tested else {}), **plots},
        "threshold": task.operating_threshold([bags[i] for i in tested], [oof[i] for i in tested], t.threshold),
        "skipped": {"no_features": data.no_features, "no_label": data.no_label, "no_patches": data.no_patches},
    }
    write_run_summary(out_dir, summary)  # last: it marks the run complete
    return summary


def _classes(task: Task) -> dict:
    return {"classes": task.classes} if hasattr(task, "classes") else {}


def _write_predictions(out_dir: Path, task: Task, bags: list, oof: list, fold_of: np.ndarray, data: BagSet) -> None:
    """One row per bag: a slide, or (``train.bag_level=patient``) a patient with its slides listed."""
    rows = [{"slide_id": b.slide_id, "patient_id": b.patient_id, "fold": int(fold_of[i]),
             **({"slides": ";".join(b.slides)} if b.slides else {}), **task.prediction(b, oof[i])}
            for i, b in enumerate(bags)]
    for sid in data.no_patches:  # in the cohort, but no bag: no prediction, as in predict
        rows.append({"slide_id": sid, "fold": -1, "note": "0 patches (no tissue): no prediction"})
    slides = ["slides"] if any(b.slides for b in bags) else []
    write_csv(out_dir / "predictions.csv", rows,
              ["slide_id", "patient_id", *slides, *task.truth_columns(), "fold", *task.output_columns(), "note"])


def check_bags(data: BagSet, cache: BagCache, progress: bool = False) -> None:
    """Read every bag once before any fold trains (filling the cache): a file with NaN or inf features, or
    one that cannot be read, is one line naming it now, not a crash after a whole cross-validation."""
    bad = []
    for bag in tqdm(data.bags, desc="reading bags", leave=False, disable=not progress):
        try:
            cache.get(bag)
        except (WsiMilError, OSError, KeyError) as exc:
            bad.append(one_line(exc))
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise WsiMilError(f"cannot train: {bad[0]}{more}; extract those slides again or remove them from the labels")


def run_names(cfg: Config) -> list[tuple[str, str]]:
    """(model name, run name) for each model in ``model.name``: one model trains into ``train.run_name``,
    several into ``<run_name>_<model>`` each."""
    names = cfg.model.names
    if len(names) == 1:
        return [(names[0], cfg.train.run_name)]
    return [(n, f"{cfg.train.run_name}_{n}") for n in names]


def train(layout: Layout, cfg: Config, progress: bool = True) -> tuple[dict, Path]:
    """Train every model in ``model.name`` on the same splits; returns the last summary and run folder."""
    for name in cfg.model.names:  # an unknown head or option is one line now, before any bag is read
        build_model(cfg.model.model_copy(update={"name": name}), 1, 2)
    if cfg.train.labels is None:
        raise WsiMilError("train.labels is required: a CSV with slide_id,label[,patient_id] (e.g. train.labels=labels.csv)")
    kind = task_class(cfg.train.task)
    kind({}, cfg.train)  # an unknown task or a bad task setting is one line now, before any bag is read
    data = load_bagset(features_dir(layout, cfg), cfg.train.labels, cfg.train.missing, cfg.train.split_column,
                       fold_case=cfg.train.fold_label_case, columns=kind.label_columns(cfg.train),
                       parse=kind.parse_labels(cfg.train))
    if cfg.train.bag_level == "patient":
        data = patient_bags(data)
    for what, ids in (("labelled slides without features", data.no_features),
                      ("feature files without a label", data.no_label),
                      ("labelled slides with 0 patches (no prediction)", data.no_patches)):
        if ids:
            print(f"skipped {len(ids)} {what}: {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}")
    clean_stale_temps(layout.models_dir)  # runs a killed train left half-built
    cache = BagCache.from_config(cfg.train, share=max(1, cfg.train.num_workers))  # shared by every model and fold
    check_bags(data, cache, progress)
    for model_name, run in run_names(cfg):
        one = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": model_name}),
                                     "train": cfg.train.model_copy(update={"run_name": run})})
        final = layout.run_dir(run)
        with atomic_path(final) as tmp:
            summary = train_cv(data, one, tmp, progress=progress, cache=cache)
        key = summary["main_metric"]
        ms = summary["mean_std"].get(key)
        shown = {"auroc": "AUROC", "c_index": "c-index", "r2": "R²", "macro_auroc": "macro AUROC"}.get(key, key)
        score = (f"{shown} {ms['mean']:.3f} ± {ms['std']:.3f} over {len(summary['folds'])} folds" if ms
                 else "no test folds")
        bags = (f"{summary['n_bags']} patients ({summary['n_slides']} slides)" if summary["bag_level"] == "patient"
                else f"{summary['n_bags']} slides")
        print(f"train: {bags}, {model_name} on {data.encoder_id} features; {score}; -> {final}")
    return summary, final
