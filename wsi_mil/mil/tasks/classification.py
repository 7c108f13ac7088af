"""Classification: one class per bag, softmax over C logits, cross-entropy (class-weighted with
``train.balance=weighted_loss``); metrics from sklearn (:mod:`wsi_mil.mil.metrics`); ``prob_<class>`` and
``pred`` columns (the argmax)."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from ..data import Bag
from ..metrics import classification_metrics
from .base import MapView, Task, register


@register
class Classification(Task):
    name = "classification"
    main_metric = "auroc"
    fold_keys = ("auroc", "balanced_accuracy", "accuracy", "macro_f1")
    uses_class_weight = True

    def __init__(self, label_map: dict[str, int], tcfg=None):
        self.label_map = label_map
        self.classes = sorted(label_map, key=label_map.get)
        self.threshold: float | None = None  # binary: the run's operating threshold (None: the argmax)

    def call(self, output: np.ndarray) -> int:
        """The predicted class: the positive (second) class at or above the run's threshold when there is
        one (binary runs), else the argmax."""
        if self.threshold is not None and len(output) == 2:
            return int(output[1] >= self.threshold)
        return int(np.argmax(output))

    def operating_threshold(self, bags: list[Bag], outputs: list[np.ndarray], rule: str) -> dict:
        """Binary runs: ``train.threshold`` picked on the out-of-fold probabilities only (see
        :mod:`wsi_mil.mil.threshold`), with its out-of-fold sensitivity and specificity."""
        from ..threshold import operating_point, pick_threshold

        if len(self.classes) != 2 or not bags:
            return {}
        y = np.array([b.label for b in bags])
        p = np.array([o[1] for o in outputs])
        value = pick_threshold(y, p, rule)
        return {"rule": rule, "value": value, "positive_class": self.classes[1], **operating_point(y, p, value)}

    def ensemble_metrics(self, bags: list[Bag], outputs: np.ndarray) -> dict:
        """Binary: AUROC, balanced accuracy, F1, sensitivity and specificity at the run's threshold, Brier
        score. Multi-class: macro one-vs-rest AUROC, balanced accuracy, macro F1, and the quadratic weighted
        kappa when the classes are integers (ordinal grades). All from sklearn."""
        from sklearn import metrics as m

        from ..evaluation import given, guarded
        from ..metrics import auroc

        y = np.array([b.label for b in bags])
        pred = np.array([self.call(o) for o in outputs])
        out = {"auroc": guarded(lambda i: auroc(y[i], outputs[i]), y),
               "balanced_accuracy": guarded(lambda i: m.balanced_accuracy_score(y[i], pred[i]), y)}
        if len(self.classes) == 2:
            out.update({
                "f1": lambda i: m.f1_score(y[i], pred[i], zero_division=0),
                "sensitivity": given(lambda i: m.recall_score(y[i], pred[i], pos_label=1, zero_division=0), y, 1),
                "specificity": given(lambda i: m.recall_score(y[i], pred[i], pos_label=0, zero_division=0), y, 0),
                "brier": lambda i: m.brier_score_loss(y[i], outputs[i, 1])})
        else:
            out["macro_f1"] = lambda i: m.f1_score(y[i], pred[i], average="macro", zero_division=0)
            if all(c.lstrip("-").isdigit() for c in self.classes):
                out["quadratic_kappa"] = guarded(lambda i: m.cohen_kappa_score(y[i], pred[i], weights="quadratic"), y)
        return out

    def evaluation_plots(self, out_dir, bags: list[Bag], outputs: np.ndarray, groups: np.ndarray, n_boot: int,
                         seed: int) -> dict:
        from pathlib import Path

        from ..evaluation import plot_classification

        y = np.array([b.label for b in bags])
        pred = np.array([self.call(o) for o in outputs])
        return plot_classification(Path(out_dir), y, outputs[:, -1], pred, self.classes, groups, min(n_boot, 200), seed)

    def with_threshold(self, threshold: dict) -> Classification:
        import copy

        fold = copy.copy(self)
        fold.threshold = float(threshold["value"]) if threshold and "value" in threshold else None
        return fold

    @staticmethod
    def label_columns(tcfg) -> tuple[str, ...]:
        return ("label",)

    def out_dim(self) -> int:
        return len(self.classes)

    def strata(self, bags: list[Bag]) -> np.ndarray:
        return np.array([b.label for b in bags])

    def bag_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Unweighted cross-entropy; training weights classes in the heads' own bag term instead
        (``train.balance``), which is why classification passes no ``bag_loss`` to them."""
        return F.cross_entropy(logits.float(), target.long())

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), 1)

    def metrics(self, test: list[Bag], outputs: np.ndarray, train: list[Bag]) -> dict:
        return classification_metrics(np.array([b.label for b in test]), outputs, self.classes)

    def truth(self, bag: Bag) -> dict:
        return {"label": self.classes[bag.label]}

    def truth_columns(self) -> list[str]:
        return ["label"]

    def output_columns(self) -> list[str]:
        return [*(f"prob_{c}" for c in self.classes), "pred"]

    def prediction(self, bag: Bag, output: np.ndarray | None) -> dict:
        row = self.truth(bag)
        row.update({f"prob_{c}": "" if output is None else f"{output[k]:.6f}" for k, c in enumerate(self.classes)})
        row["pred"] = "" if output is None else self.classes[self.call(output)]
        return row

    def ensemble_row(self, output: np.ndarray | None) -> dict:
        row = {f"prob_{c}": "" if output is None else f"{output[k]:.6f}" for k, c in enumerate(self.classes)}
        row["pred"] = "" if output is None else self.classes[self.call(output)]
        return row

    def map_view(self, output: np.ndarray) -> MapView:
        """The predicted class's map (per-class heads: one map per class)."""
        k = self.call(output)
        values = {f"prob_{c}": float(p) for c, p in zip(self.classes, output)}
        return MapView(f"pred: {self.classes[k]} ({output[k]:.2f})", values, list(self.classes), self.classes[k],
                       self.classes[k])

    def describe(self) -> dict:
        return {"task": self.name, "classes": self.classes}
