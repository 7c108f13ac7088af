"""Survival: right-censored time to event per bag.

- ``train.survival.loss=nll``: K = ``train.survival.bins`` hazard logits; the discrete-time NLL of Zadeh &
  Mahmood (2021), intervals cut at quantiles of the training fold's uncensored times. Outputs the survival
  curve S_1..S_K (``surv_t1..tK``) and the risk -sum_k S_k.
- ``train.survival.loss=cox``: one logit, the risk; the Cox partial likelihood (Breslow ties) over each
  mini-batch of bags, so ``train.batch_size`` must be at least 2.
Losses and metrics: :mod:`wsi_mil.mil.survival` (scikit-survival's Harrell and Uno c-index, td-AUC at the
quartiles of follow-up, the integrated Brier score for the NLL's curves). Splits stratify on event x
time-above-median, grouped by patient.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from ...errors import WsiMilError
from ..data import Bag
from ..survival import (
    cox_loss,
    interval_edges,
    interval_of,
    nll_loss,
    plot_km,
    risk_from_curves,
    survival_labels,
    survival_metrics,
)
from .base import Task, register


def _arrays(bags: list[Bag]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([b.time for b in bags], float), np.array([b.event for b in bags], int)


def _harrell(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's c-index (scikit-survival); NaN without an event or a comparable pair."""
    from sksurv.metrics import concordance_index_censored

    if not event.any() or len(time) < 2:
        return math.nan
    try:
        return float(concordance_index_censored(event.astype(bool), time, risk)[0])
    except ValueError:  # no comparable pair
        return math.nan


@register
class Survival(Task):
    name = "survival"
    main_metric = "c_index"
    fold_keys = ("c_index", "c_index_uno", "mean_td_auc", "ibs")

    def __init__(self, label_map: dict[str, int], tcfg=None):
        s = tcfg.survival
        self.loss, self.bins, self.alpha, self.groups, self.monitor_on = s.loss, s.bins, s.alpha, s.groups, s.monitor
        if self.loss == "cox" and tcfg.batch_size < 2:
            raise WsiMilError("train.survival.loss=cox compares the bags of a batch: set train.batch_size to 2 "
                              "or more (e.g. 32), or use train.survival.loss=nll")
        self.edges: np.ndarray | None = None

    @staticmethod
    def label_columns(tcfg) -> tuple[str, ...]:
        return (tcfg.survival.time_column, tcfg.survival.event_column)

    @staticmethod
    def parse_labels(tcfg):
        cols = (tcfg.survival.time_column, tcfg.survival.event_column)

        def parse(rows: list[dict], name: str) -> list[dict]:
            return [{"time": s.time, "event": s.event} for s in survival_labels(rows, name, *cols)]
        return parse

    def for_fold(self, train: list[Bag]) -> Survival:
        fold = copy.copy(self)
        if self.loss == "nll":
            fold.edges = interval_edges(*_arrays(train), self.bins)
        return fold

    def out_dim(self) -> int:
        return 1 if self.loss == "cox" else self.bins

    def intervals(self, bags: list[Bag]) -> list[int]:
        if self.edges is None:
            return [0] * len(bags)
        return interval_of(_arrays(bags)[0], self.edges).tolist()

    def strata(self, bags: list[Bag]) -> np.ndarray:
        """Event x time above the median; event alone when a cell is too small (< 5) to spread over folds."""
        time, event = _arrays(bags)
        cells = event * 2 + (time > np.median(time)).astype(int)
        return cells if np.bincount(cells).min(initial=5) >= 5 or len(np.unique(cells)) < 4 else event

    def bag_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        interval, time, event = target[:, 0], target[:, 1], target[:, 2]
        if self.loss == "cox":
            return cox_loss(logits[:, 0], time, event)
        return nll_loss(logits[:, : len(self.edges) - 1], interval, event, self.alpha)

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        if self.loss == "cox":
            return logits.float()[:, :1]
        return torch.cumprod(1 - torch.sigmoid(logits.float()[:, : len(self.edges) - 1]), dim=1)

    def risk(self, outputs: np.ndarray) -> np.ndarray:
        return outputs[:, 0] if self.loss == "cox" else risk_from_curves(outputs)

    def fold_bags(self, bags: list[Bag]) -> list[Bag]:
        """The bags with ``label`` set to this fold's interval of their time (what the NLL compares with)."""
        return [dataclasses.replace(b, label=k) for b, k in zip(bags, self.intervals(bags))]

    def metrics(self, test: list[Bag], outputs: np.ndarray, train: list[Bag]) -> dict:
        time, event = _arrays(test)
        curves = curve_times = None
        if self.loss == "nll":  # S_k is the survival past interval k: evaluated at the interval's end
            curves, curve_times = outputs, self.edges[1:-1]
            curves = curves[:, : len(curve_times)]
        return survival_metrics(time, event, self.risk(outputs), *_arrays(train), curves, curve_times)

    def pooled_metrics(self, test: list[Bag], outputs: list[np.ndarray], train: list[Bag]) -> dict:
        """Pooled over folds, each bag's risk from its own fold; the folds' intervals differ, so no IBS."""
        risk = np.array([float(self.risk(o[None])[0]) for o in outputs])
        return survival_metrics(*_arrays(test), risk, *_arrays(train))

    def val_metrics(self, val: list[Bag], outputs: np.ndarray) -> dict:
        return {"val_c_index": _harrell(*_arrays(val), self.risk(outputs))}

    def monitor(self, row: dict) -> float:
        if self.monitor_on == "c_index":
            c = row.get("val_c_index", math.nan)
            return math.inf if math.isnan(c) else -c
        return row["val_loss"]

    def write_plots(self, out_dir, bags: list[Bag], outputs: list) -> dict:
        """km.png: Kaplan-Meier curves of the out-of-fold risk groups, with the log-rank p-value."""
        tested = [(b, o) for b, o in zip(bags, outputs) if o is not None]
        if len(tested) < 2:
            return {}
        time, event = _arrays([b for b, _ in tested])
        risk = np.array([float(self.risk(o[None])[0]) for _, o in tested])
        p = plot_km(time, event, risk, self.groups, Path(out_dir) / "km.png", "out-of-fold risk groups: ")
        return {"km_groups": self.groups, "logrank_p": p}

    def truth(self, bag: Bag) -> dict:
        return {"time": f"{bag.time:g}", "event": bag.event}

    def truth_columns(self) -> list[str]:
        return ["time", "event"]

    def output_columns(self) -> list[str]:
        return ["risk", *([f"surv_t{k + 1}" for k in range(self.bins)] if self.loss == "nll" else [])]

    def prediction(self, bag: Bag, output: np.ndarray | None) -> dict:
        row = self.truth(bag)
        if output is None:
            return {**row, "risk": ""}
        row["risk"] = f"{float(self.risk(output[None])[0]):.6f}"
        if self.loss == "nll":
            row.update({f"surv_t{k + 1}": f"{v:.6f}" for k, v in enumerate(output)})
        return row

    def restore(self, described: dict) -> Survival:
        fold = copy.copy(self)
        if described.get("interval_edges"):
            fold.edges = np.array(described["interval_edges"], float)
        return fold

    def ensemble_output(self, outputs: np.ndarray) -> np.ndarray:
        """The folds' intervals differ, so the ensemble averages the risk, not the curves."""
        return self.risk(outputs)[:1]

    def ensemble_columns(self) -> list[str]:
        return ["risk"]

    def ensemble_row(self, output: np.ndarray | None) -> dict:
        return {"risk": "" if output is None else f"{float(output[0]):.6f}"}

    def ensemble_metrics(self, bags: list[Bag], outputs: np.ndarray) -> dict:
        """Harrell's c-index of the ensemble's risk (scikit-survival); undefined without an event."""
        time, event = _arrays(bags)
        return {"c_index": lambda i: _harrell(time[i], event[i], outputs[i, 0])}

    def evaluation_plots(self, out_dir, bags: list[Bag], outputs: np.ndarray, groups: np.ndarray, n_boot: int,
                         seed: int) -> dict:
        """km.png: Kaplan-Meier curves of the cohort's risk groups with the log-rank p-value."""
        if len(bags) < 2:
            return {}
        p = plot_km(*_arrays(bags), outputs[:, 0], self.groups, Path(out_dir) / "km.png", "risk groups: ")
        return {"km_groups": self.groups, "logrank_p": p}

    def describe(self) -> dict:
        out = {"task": self.name, "loss": self.loss}
        if self.edges is not None:
            out["interval_edges"] = [float(e) for e in self.edges]
        return out
