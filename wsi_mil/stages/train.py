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
from ..mil.data import BagCache, BagSet, load_bagset
from ..mil.ensemble import write_run_summary
from ..mil.metrics import classification_metrics, mean_std
from ..mil.models import build_model
from ..mil.splits import fixed_split, kfold_splits
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


def train_cv(data: BagSet, cfg: Config, out_dir: Path, progress: bool = False, cache: BagCache | None = None) -> dict:
    """Train every fold and write every output into ``out_dir`` (summary.json last); return the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bags = data.bags
    y = np.array([b.label for b in bags])
    groups = np.array([b.patient_id for b in bags])
    t = cfg.train
    splits = (fixed_split([b.split for b in bags]) if t.split_column
              else kfold_splits(y, groups, t.folds, t.val_fraction, t.seed))
    classes = sorted(data.label_map, key=data.label_map.get)
    device = pick_device(t.device)
    cache = cache or BagCache.from_config(t, share=max(1, t.num_workers))
    split_rows, history, fold_metrics, fold_files, fold_sha = [], [], [], [], []
    oof = np.full((len(bags), len(classes)), np.nan)
    fold_of = np.full(len(bags), -1)
    for fold, (tr, va, te) in enumerate(splits):
        for name, idx in (("train", tr), ("val", va), ("test", te)):
            split_rows += [{"slide_id": bags[i].slide_id, "patient_id": bags[i].patient_id,
                            "label": classes[bags[i].label], "fold": fold, "split": name} for i in idx]
        res = fit([bags[i] for i in tr], [bags[i] for i in va], data.feature_dim, len(classes), cfg.model, t,
                  seed=t.seed + fold, device=device, progress=progress, cache=cache)
        history += [{"fold": fold, **h} for h in res.history]
        meta = CheckpointMeta(config_to_dict(cfg.model), data.label_map, data.feature_dim, data.encoder_id,
                              fold, res.best_epoch, config_to_dict(cfg))
        save_checkpoint(out_dir / f"fold_{fold}.safetensors", res.model, meta)
        fold_files.append(f"fold_{fold}.safetensors")
        fold_sha.append(file_sha256(out_dir / f"fold_{fold}.safetensors"))
        if len(te):
            probs, _ = predict_bags(res.model, [bags[i] for i in te], device=device, cache=cache, amp=t.amp)
            oof[te], fold_of[te] = probs, fold
            fold_metrics.append({"fold": fold, "best_epoch": res.best_epoch,
                                 **classification_metrics(y[te], probs, classes)})
    write_csv(out_dir / "splits.csv", split_rows)
    pred_rows = []
    for i, b in enumerate(bags):
        row = {"slide_id": b.slide_id, "patient_id": b.patient_id, "label": classes[b.label],
               "fold": int(fold_of[i])}
        row.update({f"prob_{c}": ("" if np.isnan(oof[i, k]) else f"{oof[i, k]:.6f}") for k, c in enumerate(classes)})
        row["pred"] = "" if np.isnan(oof[i]).any() else classes[int(np.nanargmax(oof[i]))]
        pred_rows.append(row)
    for sid in data.no_patches:  # in the cohort, but no bag: no prediction, as in predict
        pred_rows.append({"slide_id": sid, "fold": -1, "note": "0 patches (no tissue): no prediction"})
    write_csv(out_dir / "predictions.csv", pred_rows,
              ["slide_id", "patient_id", "label", "fold", *(f"prob_{c}" for c in classes), "pred", "note"])
    write_csv(out_dir / "history.csv", history)
    _plot_curves(history, out_dir / "curves.png")
    write_text(out_dir / "label_map.json", json.dumps(data.label_map, indent=1))
    write_text(out_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tested = ~np.isnan(oof).any(1)
    summary = {
        "run": cfg.train.run_name, "model": cfg.model.name, "fold_files": fold_files, "fold_sha256": fold_sha, "encoder_id": data.encoder_id,
        "feature_dim": data.feature_dim, "classes": classes, "n_slides": len(bags), "n_folds": len(splits),
        "folds": fold_metrics,
        "mean_std": mean_std(fold_metrics) if fold_metrics else {},
        "pooled_out_of_fold": classification_metrics(y[tested], oof[tested], classes) if tested.any() else {},
        "skipped": {"no_features": data.no_features, "no_label": data.no_label, "no_patches": data.no_patches},
    }
    write_run_summary(out_dir, summary)  # last: it marks the run complete
    return summary


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
    data = load_bagset(features_dir(layout, cfg), cfg.train.labels, cfg.train.missing, cfg.train.split_column,
                       fold_case=cfg.train.fold_label_case)
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
        ms = summary["mean_std"].get("auroc")
        auroc = (f"AUROC {ms['mean']:.3f} ± {ms['std']:.3f} over {len(summary['folds'])} folds" if ms
                 else "no test folds")
        print(f"train: {len(data.bags)} slides, {model_name} on {data.encoder_id} features; {auroc}; -> {final}")
    return summary, final
