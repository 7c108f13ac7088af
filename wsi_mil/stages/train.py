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
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from ..atomic import atomic_path, clean_stale_temps, file_sha256, write_csv, write_text
from ..config import Config, config_to_dict
from ..errors import WsiMilError, one_line
from ..layout import Layout, encoder_id
from ..mil.checkpoint import save_checkpoint
from ..mil.data import BagCache, BagSet, load_bagset, patient_bags
from ..mil.ddp import init_from_env, is_main
from ..mil.ensemble import write_run_summary
from ..mil.folds import FoldFit, FoldSpec, fit_fold, make_task, use_cache
from ..mil.metrics import mean_std
from ..mil.models import build_model
from ..mil.splits import fixed_split, kfold_splits
from ..mil.tasks import Task, task_class
from ..runner import make_executor


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


def _split_rows(task: Task, bags: list, splits: list) -> list[dict]:
    return [{"slide_id": bags[i].slide_id, "patient_id": bags[i].patient_id, **task.truth(bags[i]), "fold": fold,
             "split": name} for fold, idx in enumerate(splits) for name, members in zip(("train", "val", "test"), idx)
            for i in members]


def cv_splits(data: BagSet, cfg: Config) -> list:
    """(train, val, test) indices per fold: the split column, or patient-grouped stratified k-fold."""
    t, bags = cfg.train, data.bags
    if t.split_column:
        return fixed_split([b.split for b in bags])
    groups = np.array([b.patient_id for b in bags])
    return kfold_splits(make_task(data, cfg).strata(bags), groups, t.folds, t.val_fraction, t.seed)


def write_run(data: BagSet, cfg: Config, splits: list, fits: list[FoldFit], out_dir: Path) -> dict:
    """Write one run from its fold fits, whose checkpoints are in ``out_dir`` already (summary.json last);
    return the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    task, bags, t = make_task(data, cfg), data.bags, cfg.train
    history, fold_metrics, fold_files, fold_sha = [], [], [], []
    oof: list[np.ndarray | None] = [None] * len(bags)
    fold_of = np.full(len(bags), -1)
    for res in sorted(fits, key=lambda f: f.fold):
        name = f"fold_{res.fold}.safetensors"  # saved as the fit finished
        fold_files.append(name)
        fold_sha.append(file_sha256(out_dir / name))
        history += res.history
        if res.metrics is not None:
            for i, row in zip(splits[res.fold][2], res.test_outputs):
                oof[i], fold_of[i] = row, res.fold
            fold_metrics.append(res.metrics)
    write_csv(out_dir / "splits.csv", _split_rows(task, bags, splits))
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


def load_training_bags(layout: Layout, cfg: Config) -> BagSet:
    """The labelled bags (checked settings first, so a bad one is one line before any bag is read); what
    was skipped is printed."""
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
    return data


def train(layout: Layout, cfg: Config, progress: bool = True) -> tuple[dict, Path]:
    """Train every model in ``model.name`` on the same splits, each (model, fold) fit a task on
    ``runner.executor``; returns the last summary and run folder."""
    if init_from_env() and cfg.runner.executor != "serial":
        raise WsiMilError("train: data-parallel ranks (--nproc, torchrun) run their fits themselves; "
                          "leave runner.executor=serial")
    data = load_training_bags(layout, cfg)
    main_rank = is_main()  # under DDP every rank fits, and rank 0 alone writes
    if main_rank:
        clean_stale_temps(layout.models_dir)  # runs a killed train left half-built
    in_process = cfg.runner.executor == "serial"
    # in-process fits share the driver's cache, filled here; worker processes fill their own, so then the
    # driver only checks each bag and keeps none
    cache = BagCache.from_config(cfg.train, share=max(1, cfg.train.num_workers)) if in_process else BagCache(0)
    check_bags(data, cache, progress)
    runs = [(model_name, run, cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"name": model_name}),
        "train": cfg.train.model_copy(update={"run_name": run})})) for model_name, run in run_names(cfg)]
    splits = cv_splits(data, cfg)
    if not main_rank:
        run_fits(data, [one for _, _, one in runs], splits, cfg, cache, False, lambda n, res: None)
        return {}, layout.run_dir(runs[-1][1])
    with ExitStack() as stack:  # every run is built in its temp folder and swapped in whole at the end
        tmps = [stack.enter_context(atomic_path(layout.run_dir(run))) for _, run, _ in runs]

        def keep(n: int, res: FoldFit) -> None:  # each fold's weights are on disk as soon as it is fitted
            save_checkpoint(tmps[n] / f"fold_{res.fold}.safetensors", res.state, res.meta)
            res.state = {}

        fits = run_fits(data, [one for _, _, one in runs], splits, cfg, cache, progress, keep)
        summaries = [write_run(data, one, splits, run_fits_, tmp)
                     for (_, _, one), run_fits_, tmp in zip(runs, fits, tmps)]
    for (model_name, run, _), summary in zip(runs, summaries):
        print(f"train: {_bags_line(summary)}, {model_name} on {data.encoder_id} features; {_score_line(summary)}; "
              f"-> {layout.run_dir(run)}")
    return summaries[-1], layout.run_dir(runs[-1][1])


def _score_line(summary: dict) -> str:
    key = summary["main_metric"]
    ms = summary["mean_std"].get(key)
    shown = {"auroc": "AUROC", "c_index": "c-index", "r2": "R²", "macro_auroc": "macro AUROC"}.get(key, key)
    if not ms:
        return "no test folds"
    if not math.isfinite(ms["mean"]):
        return f"{shown} undefined in every one of the {len(summary['folds'])} test folds"
    return f"{shown} {ms['mean']:.3f} ± {ms['std']:.3f} over {len(summary['folds'])} folds"


def _bags_line(summary: dict) -> str:
    if summary["bag_level"] == "patient":
        return f"{summary['n_bags']} patients ({summary['n_slides']} slides)"
    return f"{summary['n_bags']} slides"


@dataclass(frozen=True)
class _Lost:
    reason: str


def run_fits(data: BagSet, cfgs: list[Config], splits: list, cfg: Config, cache: BagCache, progress: bool,
             on_fit) -> list[list[FoldFit]]:
    """Every (model, fold) fit as one task on ``runner.executor``; the fits of each config, in fold order.
    ``on_fit(config index, fit)`` sees each fit as it finishes. A fit whose worker died ``runner.retries``
    times fails the train with one line."""
    r, token = cfg.runner, uuid.uuid4().hex
    use_cache(token, cache)  # tasks that run in this process read through the driver's cache
    in_process = r.executor == "serial"
    specs = [FoldSpec(data, one, fold, idx, token, n * len(splits) + fold, progress and in_process)
             for n, one in enumerate(cfgs) for fold, idx in enumerate(splits)]
    gpu = {"GPU": 1} if cfg.train.device in ("auto", "cuda") else None
    executor = make_executor(r.executor, r.workers, r.retries, r.dask_address, resources=gpu)
    done: dict[int, FoldFit] = {}
    try:
        bar = tqdm(total=len(specs), desc="fits", disable=not progress or len(specs) < 2, leave=False)
        for spec, res in executor.imap(fit_fold, specs, lambda spec, why: _Lost(why)):
            if isinstance(res, _Lost):
                raise WsiMilError(f"train: {spec.cfg.model.name} fold {spec.fold} did not finish: {res.reason}")
            on_fit(spec.index // len(splits), res)
            done[spec.index] = res
            bar.update()
        bar.close()
    finally:
        executor.close()
    return [[done[n * len(splits) + fold] for fold in range(len(splits))] for n in range(len(cfgs))]
