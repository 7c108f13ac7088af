"""``wsi-mil compare RUN...``: heads trained on the same folds, side by side.

Each run is a row: AUROC, balanced accuracy and macro F1 as mean ± std over its test folds, and a paired
t-test of its per-fold AUROC against the best run's (the folds must be the same slides: runs trained in
one ``wsi-mil train model.name=a,b,...`` are). The main metric is also given pooled out of fold with its
95% bootstrap interval over patients (:mod:`.intervals`, 1,000 seeded resamples), and, for runs tested on
the same slides, a paired test on the pooled predictions against the best run's: DeLong's test for a
binary AUROC, a paired bootstrap (the same patient resamples for both runs) otherwise. Writes
``comparison.csv``, ``comparison.md`` and ``comparison.png`` (per-fold AUROC, one line per model).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, write_csv, write_text
from ..errors import WsiMilError
from ..userfiles import read_json
from .ensemble import RUN_MARKER, model_files
from .metrics import mean_std

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
    # a fold metric left undefined (one class in the test fold) is null in the file, NaN here
    folds = [{k: math.nan if v is None else v for k, v in f.items()} for f in summary["folds"]]
    return {"run": run.name, "model": summary.get("model", "?"), "folds": folds, "splits": splits,
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


def _pooled(run: Path, task: str) -> dict | None:
    """The out-of-fold predictions as (ids, patients, what the main metric needs), from predictions.csv."""
    from ..userfiles import read_csv_rows

    path = Path(run) / "predictions.csv"
    if not path.is_file():
        return None
    rows = [r for r in read_csv_rows(path, path.name) if r.get("fold") not in (None, "", "-1")]
    probs = [c for c in (rows[0] if rows else {}) if c.startswith("prob_")]
    if not rows:
        return None
    if task == "classification" and len(probs) == 2:
        pos = probs[1][5:]
        cols = {"y": np.array([r["label"] == pos for r in rows], float), "s": np.array([float(r[probs[1]]) for r in rows])}
    elif task == "survival":
        cols = {"t": np.array([float(r["time"]) for r in rows]), "e": np.array([r["event"] == "1" for r in rows]),
                "s": np.array([float(r["risk"]) for r in rows])}
    elif task == "regression":
        cols = {"y": np.array([float(r["label"]) for r in rows]), "s": np.array([float(r["pred"]) for r in rows])}
    else:
        return None
    return {"ids": [r["slide_id"] for r in rows], "groups": np.array([r.get("patient_id") or r["slide_id"] for r in rows]),
            **cols}


def _pooled_metric(task: str, d: dict, i: np.ndarray) -> float:
    from sklearn.metrics import r2_score, roc_auc_score

    if task == "classification":
        return float(roc_auc_score(d["y"][i], d["s"][i])) if len(np.unique(d["y"][i])) == 2 else math.nan
    if task == "survival":
        from sksurv.metrics import concordance_index_censored

        if not d["e"][i].any():
            return math.nan
        try:
            return float(concordance_index_censored(d["e"][i], d["t"][i], d["s"][i])[0])
        except ValueError:
            return math.nan
    return float(r2_score(d["y"][i], d["s"][i])) if len(i) > 1 else math.nan


def _paired_pooled(task: str, a: dict, b: dict, n_boot: int = 1000, seed: int = 0) -> float:
    """p of the pooled main metric differing between two runs on the same slides: DeLong (binary AUROC),
    else a paired bootstrap over patients (two-sided, from the share of resamples on either side of 0)."""
    from .intervals import delong_test

    if task == "classification":
        return delong_test(a["y"], a["s"], b["s"])["p"]
    uniq, inv = np.unique(a["groups"], return_inverse=True)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        i = np.concatenate([np.flatnonzero(inv == g) for g in rng.integers(0, len(uniq), len(uniq))])
        d = _pooled_metric(task, a, i) - _pooled_metric(task, b, i)
        if math.isfinite(d):
            diffs.append(d)
    if not diffs:
        return math.nan
    diffs = np.array(diffs)
    return float(min(1.0, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())))


def _add_pooled(rows: list[dict], loaded: list[dict], runs: list[Path], task: str, best: int) -> None:
    from .intervals import bootstrap_ci

    pooled = [_pooled(r, task) for r in runs]
    ref = pooled[best]
    for row, d in zip(rows, pooled):
        ci = bootstrap_ci(lambda i, d=d: _pooled_metric(task, d, i), d["groups"]) if d else None
        row["pooled"], row["pooled_low"], row["pooled_high"] = ((ci["value"], ci["low"], ci["high"]) if ci
                                                                 else (math.nan,) * 3)
        same = d is not None and ref is not None and d["ids"] == ref["ids"]
        row["p_pooled_vs_best"] = (math.nan if not same or row["best"] else _paired_pooled(task, d, ref))


def compare(runs: list[Path], loaded: list[dict] | None = None) -> list[dict]:
    loaded = loaded or [_load(r) for r in runs]
    metrics = _metrics(loaded)
    main = metrics[0]
    rows = []
    for item in loaded:
        row = {"run": item["run"], "model": item["model"], "n_folds": len(item["folds"])}
        for m, ms in mean_std(item["folds"], metrics).items():
            row[f"{m}_mean"], row[f"{m}_std"] = ms["mean"], ms["std"]
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
    _add_pooled(rows, loaded, [Path(r) for r in runs], loaded[0]["task"], best)
    return rows


def _markdown(rows: list[dict], metrics: tuple[str, ...]) -> str:
    heads = [TITLES.get(m, m) for m in metrics]
    lines = ["| model | run | folds | " + " | ".join(heads) + f" | paired t-test p vs best ({heads[0]}) "
             f"| pooled {heads[0]} [95% CI] | pooled p vs best |",
             "|---|---|---|" + "---|" * len(metrics) + "---|---|---|"]

    def p_text(r, key):
        return "best" if r["best"] else ("n/a (other slides)" if math.isnan(r[key]) else f"{r[key]:.3g}")

    for r in sorted(rows, key=lambda r: -np.nan_to_num(r[f"{metrics[0]}_mean"], nan=-np.inf)):
        cells = [f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_std']:.3f}" for m in metrics]
        pooled = "n/a" if math.isnan(r["pooled"]) else f"{r['pooled']:.3f} [{r['pooled_low']:.3f}, {r['pooled_high']:.3f}]"
        lines.append(f"| {r['model']} | {r['run']} | {r['n_folds']} | " + " | ".join(cells) +
                     f" | {p_text(r, 'p_vs_best')} | {pooled} | {p_text(r, 'p_pooled_vs_best')} |")
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
