"""Multi-label: several binary targets per bag (``train.label_columns``, e.g. a panel of mutations), one
sigmoid output each; binary cross-entropy with, under ``train.balance=weighted_loss``, a per-target
positive weight (negatives / positives on the training fold). Metrics: per-target AUROC and their macro
mean (sklearn). Splits stratify on the first target, grouped by patient."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch.nn import functional as F

from ...errors import WsiMilError
from ..data import Bag
from .base import MapView, Task, parse_rows, register


def _matrix(bags: list[Bag]) -> np.ndarray:
    return np.array([b.values for b in bags], int)


@register
class MultiLabel(Task):
    name = "multilabel"
    main_metric = "macro_auroc"
    fold_keys = ("macro_auroc",)

    def __init__(self, label_map: dict[str, int], tcfg=None):
        self.targets = list(tcfg.label_columns) if tcfg is not None else []
        if len(self.targets) < 1:
            raise WsiMilError("train.task=multilabel needs train.label_columns: the CSV's 0/1 columns, "
                              "e.g. train.label_columns=[TP53,KRAS]")
        self.weighted = tcfg.balance == "weighted_loss"
        self.pos_weight: torch.Tensor | None = None

    @staticmethod
    def label_columns(tcfg) -> tuple[str, ...]:
        return tuple(tcfg.label_columns)

    @staticmethod
    def parse_labels(tcfg):
        columns = list(tcfg.label_columns)

        def values(row: dict) -> dict | None:
            cells = [str(row.get(c, "")).strip() for c in columns]
            return {"values": tuple(int(c) for c in cells)} if all(c in ("0", "1") for c in cells) else None
        return lambda rows, name: parse_rows(rows, name, values, f"{', '.join(columns)} must each be 0 or 1")

    def for_fold(self, train: list[Bag]) -> MultiLabel:
        fold = copy.copy(self)
        if self.weighted:
            y = _matrix(train)
            pos = y.sum(0)
            fold.pos_weight = torch.tensor(np.where(pos > 0, (len(y) - pos) / np.maximum(pos, 1), 1.0), dtype=torch.float32)
        return fold

    def out_dim(self) -> int:
        return len(self.targets)

    def strata(self, bags: list[Bag]) -> np.ndarray:
        return _matrix(bags)[:, 0]

    def bag_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = None if self.pos_weight is None else self.pos_weight.to(logits.device)
        return F.binary_cross_entropy_with_logits(logits.float(), target.float(), pos_weight=weight)

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float())

    def metrics(self, test: list[Bag], outputs: np.ndarray, train: list[Bag]) -> dict:
        from sklearn.metrics import roc_auc_score

        y = _matrix(test)
        per = {}
        for k, t in enumerate(self.targets):
            per[t] = float(roc_auc_score(y[:, k], outputs[:, k])) if len(np.unique(y[:, k])) == 2 else math.nan
        scored = [v for v in per.values() if not math.isnan(v)]
        return {"n": int(len(y)), "auroc": per, "macro_auroc": float(np.mean(scored)) if scored else math.nan}

    def truth(self, bag: Bag) -> dict:
        return {f"label_{t}": v for t, v in zip(self.targets, bag.values)}

    def truth_columns(self) -> list[str]:
        return [f"label_{t}" for t in self.targets]

    def output_columns(self) -> list[str]:
        return [f"prob_{t}" for t in self.targets]

    def prediction(self, bag: Bag, output: np.ndarray | None) -> dict:
        row = self.truth(bag)
        row.update({f"prob_{t}": "" if output is None else f"{output[k]:.6f}" for k, t in enumerate(self.targets)})
        return row

    def ensemble_row(self, output: np.ndarray | None) -> dict:
        return {f"prob_{t}": "" if output is None else f"{output[k]:.6f}" for k, t in enumerate(self.targets)}

    def map_view(self, output: np.ndarray) -> MapView:
        """One map per target for per-class heads; the overlay shows the most probable target's."""
        k = int(np.argmax(output))
        values = {f"prob_{t}": float(p) for t, p in zip(self.targets, output)}
        text = "  ".join(f"{t} {p:.2f}" for t, p in zip(self.targets, output))
        return MapView(text, values, list(self.targets), self.targets[k], self.targets[k])

    def ensemble_metrics(self, bags: list[Bag], outputs: np.ndarray) -> dict:
        """Per-target AUROC and their macro mean (sklearn); a target with one class in a resample is left
        out of that resample's mean."""
        from sklearn.metrics import roc_auc_score

        y = _matrix(bags)

        def target(k):
            return lambda i: roc_auc_score(y[i, k], outputs[i, k]) if len(np.unique(y[i, k])) == 2 else math.nan

        out = {f"auroc_{t}": target(k) for k, t in enumerate(self.targets)}

        def macro(i):
            vals = [v for v in (f(i) for f in out.values()) if not math.isnan(v)]
            return float(np.mean(vals)) if vals else math.nan
        return {"macro_auroc": macro, **out}

    def describe(self) -> dict:
        return {"task": self.name, "targets": self.targets}
