"""Regression: one numeric ``label`` per bag (a biomarker score, an expression level, HRD).

The target is standardised on the training fold (mean and standard deviation of its values); the head
predicts the standardised value and the prediction is mapped back. Loss: ``train.loss`` mse, or huber
(``torch.nn.functional.huber_loss``, delta 1 in standard units). Metrics: MAE, RMSE and R² (sklearn),
Pearson's and Spearman's correlation (scipy). ``scatter.png``: out-of-fold predicted vs true. Splits
stratify on the quartile of the target, grouped by patient.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..data import Bag
from .base import Task, parse_rows, register


def _values(bags: list[Bag]) -> np.ndarray:
    return np.array([b.value for b in bags], float)


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    out = {"n": int(len(y)), "mae": math.nan, "rmse": math.nan, "r2": math.nan, "pearson": math.nan,
           "spearman": math.nan}
    if len(y) < 2:
        return out
    out.update(mae=float(mean_absolute_error(y, pred)), rmse=float(math.sqrt(mean_squared_error(y, pred))),
               r2=float(r2_score(y, pred)))
    if np.ptp(y) > 0 and np.ptp(pred) > 0:
        out.update(pearson=float(pearsonr(y, pred)[0]), spearman=float(spearmanr(y, pred)[0]))
    return out


@register
class Regression(Task):
    name = "regression"
    main_metric = "r2"
    fold_keys = ("mae", "rmse", "r2", "pearson", "spearman")

    def __init__(self, label_map: dict[str, int], tcfg=None):
        self.loss = tcfg.loss if tcfg is not None else "mse"
        self.mean, self.std = 0.0, 1.0

    @staticmethod
    def label_columns(tcfg) -> tuple[str, ...]:
        return ("label",)

    @staticmethod
    def parse_labels(tcfg):
        def value(row: dict) -> dict | None:
            try:
                v = float(row["label"])
            except ValueError:
                return None
            return {"value": v} if math.isfinite(v) else None
        return lambda rows, name: parse_rows(rows, name, value,
                                             "label must be a finite number for train.task=regression")

    def for_fold(self, train: list[Bag]) -> Regression:
        fold = copy.copy(self)
        v = _values(train)
        fold.mean, fold.std = float(v.mean()), float(v.std()) if v.std() > 0 else 1.0
        return fold

    def out_dim(self) -> int:
        return 1

    def strata(self, bags: list[Bag]) -> np.ndarray:
        """The target's quartile; halves, or one stratum, when a cell would be too small (< 5) to spread
        over folds (a small cohort is split, not refused)."""
        v = _values(bags)
        for q in (4, 2):
            cells = np.searchsorted(np.quantile(v, np.arange(1, q) / q), v, side="right")
            if np.bincount(cells).min() >= 5:
                return cells
        return np.zeros(len(v), int)

    def bag_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        z = (target.float().reshape(-1) - self.mean) / self.std
        if self.loss == "huber":
            return F.huber_loss(logits.float()[:, 0], z, delta=1.0)
        return F.mse_loss(logits.float()[:, 0], z)

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float()[:, :1] * self.std + self.mean

    def metrics(self, test: list[Bag], outputs: np.ndarray, train: list[Bag]) -> dict:
        return regression_metrics(_values(test), outputs[:, 0])

    def write_plots(self, out_dir, bags: list[Bag], outputs: list) -> dict:
        """scatter.png: out-of-fold predicted vs true, with the identity line."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ...atomic import atomic_path

        tested = [(b.value, float(o[0])) for b, o in zip(bags, outputs) if o is not None]
        if not tested:
            return {}
        y, p = np.array(tested).T
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.scatter(y, p, s=12, alpha=0.7)
        lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel("true")
        ax.set_ylabel("predicted (out of fold)")
        fig.tight_layout()
        with atomic_path(Path(out_dir) / "scatter.png") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        return {}

    def truth(self, bag: Bag) -> dict:
        return {"label": f"{bag.value:g}"}

    def truth_columns(self) -> list[str]:
        return ["label"]

    def output_columns(self) -> list[str]:
        return ["pred"]

    def prediction(self, bag: Bag, output: np.ndarray | None) -> dict:
        return {**self.truth(bag), "pred": "" if output is None else f"{float(output[0]):.6g}"}

    def restore(self, described: dict) -> Regression:
        fold = copy.copy(self)
        fold.mean, fold.std = float(described.get("target_mean", 0.0)), float(described.get("target_std", 1.0))
        return fold

    def ensemble_row(self, output: np.ndarray | None) -> dict:
        return {"pred": "" if output is None else f"{float(output[0]):.6g}"}

    def ensemble_metrics(self, bags: list[Bag], outputs: np.ndarray) -> dict:
        """R² and MAE of the ensemble's predicted value (sklearn)."""
        from sklearn.metrics import mean_absolute_error, r2_score

        from ..evaluation import guarded

        y, pred = _values(bags), outputs[:, 0]
        return {"r2": guarded(lambda i: r2_score(y[i], pred[i]), y),
                "mae": lambda i: mean_absolute_error(y[i], pred[i])}

    def evaluation_plots(self, out_dir, bags: list[Bag], outputs: np.ndarray, groups: np.ndarray, n_boot: int,
                         seed: int) -> dict:
        return self.write_plots(out_dir, bags, list(outputs))

    def describe(self) -> dict:
        return {"task": self.name, "loss": self.loss, "target_mean": self.mean, "target_std": self.std}
