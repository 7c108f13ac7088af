"""``wsi-mil compare RUN...``: heads trained on the same folds, side by side.

Each run is a row: AUROC, balanced accuracy and macro F1 as mean ± std over its test folds, and a paired
t-test of its per-fold AUROC against the best run's (the folds must be the same slides: runs trained in
one ``wsi-mil train model.name=a,b,...`` are). Writes ``comparison.csv``, ``comparison.md`` and
``comparison.png`` (per-fold AUROC, one line per model).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, write_csv, write_text
from ..errors import WsiMilError
from ..userfiles import read_json
from .ensemble import RUN_MARKER, model_files

METRICS = {  # per task, its main metric first: the one runs are ranked and paired-tested on
    "classification": ("auroc", "balanced_accuracy", "macro_f1"),
    "survival": ("c_index", "c_index_uno", "mean_td_auc"),
    "regression": ("r2", "mae", "rmse", "pearson", "spearman"),
    "multilabel": ("macro_auroc",),
}
TITLES = {"auroc": "AUROC", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1",
          "c_index": "c-index (Harrell)", "c_index_uno": "c-index (Uno)", "mean_td_auc": "mean td-AUC",
          "r2": "R²", "mae": "MAE", "rmse": "RMSE", "pearson": "Pearson r", "spearman": "Spearman ρ",
          "macro_auroc": "macro AUROC"}


def _load(run: Path) -> dict:
    """A run's summary and splits; a missing path, an incomplete run (no summary, a missing or replaced fold
    file) or an unreadable summary is one line naming it."""
    run = Path(run)
    if not run.exists():
        raise WsiMilError(f"compare: {run}: no such run folder")
    model_files(run)  # complete: summary present, every fold file there and the one trained
    summary = read_json(run / RUN_MARKER, "run summary")
    if not isinstance(summary, dict) or not summary.get("folds"):
        raise WsiMilError(f"{run}: no test folds to compare (train with train.folds >= 2)")
    splits = (run / "splits.csv").read_text() if (run / "splits.csv").is_file() else None
    return {"run": run.name, "model": summary.get("model", "?"), "folds": summary["folds"], "splits": splits,
            "task": summary.get("task", "classification")}


def _metrics(loaded: list[dict]) -> tuple[str, ...]:
    tasks = sorted({item["task"] for item in loaded})
    if len(tasks) > 1:
        raise WsiMilError(f"compare: the runs answer different tasks ({', '.join(tasks)}); compare runs of one task")
    return METRICS.get(tasks[0], METRICS["classification"])


def _paired_p(a: list[float], b: list[float]) -> float:
    from scipy.stats import ttest_rel

    diff = np.asarray(a) - np.asarray(b)
    if len(diff) < 2 or np.allclose(diff, 0):
        return 1.0
    return float(ttest_rel(a, b).pvalue)


def compare(runs: list[Path], loaded: list[dict] | None = None) -> list[dict]:
    loaded = loaded or [_load(r) for r in runs]
    metrics = _metrics(loaded)
    main = metrics[0]
    rows = []
    for item in loaded:
        row = {"run": item["run"], "model": item["model"], "n_folds": len(item["folds"])}
        for m in metrics:
            vals = np.array([f.get(m, math.nan) for f in item["folds"]], float)
            row[f"{m}_mean"], row[f"{m}_std"] = float(np.nanmean(vals)), float(np.nanstd(vals, ddof=1)) if len(vals) > 1 else 0.0
        rows.append(row)
    best = max(range(len(rows)), key=lambda i: np.nan_to_num(rows[i][f"{main}_mean"], nan=-np.inf))
    ref = loaded[best]
    for row, item in zip(rows, loaded):
        # paired only on folds known to hold the same slides: both runs' splits.csv present and equal
        same = (item["splits"] is not None and item["splits"] == ref["splits"]
                and len(item["folds"]) == len(ref["folds"]))
        row["best"] = row is rows[best]
        row["p_vs_best"] = (_paired_p([f[main] for f in item["folds"]], [f[main] for f in ref["folds"]])
                            if same else math.nan)
    return rows


def _markdown(rows: list[dict], metrics: tuple[str, ...]) -> str:
    heads = [TITLES.get(m, m) for m in metrics]
    lines = ["| model | run | folds | " + " | ".join(heads) + f" | paired t-test p vs best ({heads[0]}) |",
             "|---|---|---|" + "---|" * len(metrics) + "---|"]
    for r in sorted(rows, key=lambda r: -np.nan_to_num(r[f"{metrics[0]}_mean"], nan=-np.inf)):
        cells = [f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_std']:.3f}" for m in metrics]
        p = "best" if r["best"] else ("n/a (other folds)" if math.isnan(r["p_vs_best"]) else f"{r['p_vs_best']:.3g}")
        lines.append(f"| {r['model']} | {r['run']} | {r['n_folds']} | " + " | ".join(cells) + f" | {p} |")
    return "\n".join(lines) + "\n"


def _figure(loaded: list[dict], path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for item in loaded:
        ax.plot([f["fold"] for f in item["folds"]], [f[metric] for f in item["folds"]], "o-", label=item["model"])
    ax.set_xlabel("fold")
    ax.set_ylabel(f"test {TITLES.get(metric, metric)}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def write_comparison(runs: list[Path], out_dir: Path) -> list[dict]:
    loaded = [_load(r) for r in runs]
    rows = compare(runs, loaded)
    metrics = _metrics(loaded)
    write_csv(out_dir / "comparison.csv", rows)
    write_text(out_dir / "comparison.md", _markdown(rows, metrics))
    _figure(loaded, out_dir / "comparison.png", metrics[0])
    return rows
