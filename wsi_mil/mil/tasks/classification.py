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
        row["pred"] = "" if output is None else self.classes[int(np.argmax(output))]
        return row

    def ensemble_row(self, output: np.ndarray | None) -> dict:
        row = {f"prob_{c}": "" if output is None else f"{output[k]:.6f}" for k, c in enumerate(self.classes)}
        row["pred"] = "" if output is None else self.classes[int(np.argmax(output))]
        return row

    def map_view(self, output: np.ndarray) -> MapView:
        """The predicted class's map (per-class heads: one map per class)."""
        k = int(np.argmax(output))
        values = {f"prob_{c}": float(p) for c, p in zip(self.classes, output)}
        return MapView(f"pred: {self.classes[k]} ({output[k]:.2f})", values, list(self.classes), self.classes[k],
                       self.classes[k])

    def describe(self) -> dict:
        return {"task": self.name, "classes": self.classes}
