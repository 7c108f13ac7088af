"""The task contract: what a MIL run predicts, behind the one head contract (``forward -> MILOutput``).

A task owns the head's output width, the bag loss, what a bag's logits become (class probabilities, a
survival curve, a risk), the metrics, the prediction columns and the split strata. One task per file,
registered by name (``train.task``); adding a task is one file. A task is built for a run
(:meth:`Task.build`) and then fitted to each training fold (:meth:`Task.for_fold`), for what depends on
the training data only, such as survival intervals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ...errors import WsiMilError
from ..data import Bag

TASKS: dict[str, type[Task]] = {}


@dataclass(frozen=True)
class MapView:
    """What a heatmap shows of one bag's prediction under a task.

    ``values``: the task's prediction columns (``prob_<class>``; ``risk``; ``pred``; ``prob_<target>``);
    ``text``: the overlay title's words for them; ``maps``: the names of a per-class head's instance-score
    rows, one map each (empty: the rows collapse into one map, see :meth:`pick`); ``mapped``: the map the
    overlay shows.
    """

    text: str
    values: dict[str, float]
    maps: list[str]
    mapped: str
    label: str  # the one-word prediction (a class, the top target, or the rounded risk or value)

    def pick(self, scores: np.ndarray) -> np.ndarray:
        """The overlay's instance scores (N,): the mapped row of per-class scores; the mean of the rows where
        they collapse (a per-class head under a single-output task, e.g. survival's per-interval branches)."""
        if scores.ndim == 1:
            return scores
        return scores[self.maps.index(self.mapped)] if self.maps else scores.mean(0)

    def rows(self, scores: np.ndarray) -> np.ndarray | None:
        """The per-map scores (M, N) kept beside the overlay's, or None when there is one map."""
        return scores if scores.ndim == 2 and self.maps else None


def register(cls: type[Task]) -> type[Task]:
    if cls.name in TASKS:
        raise ValueError(f"task '{cls.name}' is registered twice")
    TASKS[cls.name] = cls
    return cls


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise WsiMilError(f"train.task: '{name}' is not one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


class Task:
    name: ClassVar[str]
    main_metric: ClassVar[str]
    fold_keys: ClassVar[tuple[str, ...]]  # the per-fold metrics summarised as mean ± std
    uses_class_weight: ClassVar[bool] = False

    @staticmethod
    def label_columns(tcfg) -> tuple[str, ...]:
        """The labels CSV's columns (besides slide_id) this task reads."""
        raise NotImplementedError

    @staticmethod
    def parse_labels(tcfg):
        """``(rows, csv name) -> [Bag target fields per row]`` for tasks whose labels are not one class
        per slide; None for classification (the label map path)."""
        return None

    def for_fold(self, train: list[Bag]) -> Task:
        """This task fitted to a training fold (default: nothing to fit)."""
        return self

    def out_dim(self) -> int:
        raise NotImplementedError

    def fold_bags(self, bags: list[Bag]) -> list[Bag]:
        """The bags as this fold's loss sees them (default: as they are)."""
        return bags

    def strata(self, bags: list[Bag]) -> np.ndarray:
        """What the cross-validation stratifies on."""
        raise NotImplementedError

    def bag_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """What a bag's logits become (per bag, one row)."""
        raise NotImplementedError

    def metrics(self, test: list[Bag], outputs: np.ndarray, train: list[Bag]) -> dict:
        raise NotImplementedError

    def pooled_metrics(self, test: list[Bag], outputs: list[np.ndarray], train: list[Bag]) -> dict:
        """Metrics over the out-of-fold outputs of every fold pooled (each bag's from its own fold)."""
        return self.metrics(test, np.stack(outputs), train)

    def truth(self, bag: Bag) -> dict:
        """The bag's target as splits.csv and predictions.csv write it."""
        raise NotImplementedError

    def truth_columns(self) -> list[str]:
        raise NotImplementedError

    def output_columns(self) -> list[str]:
        """The predictions.csv columns of a prediction (after the truth and the fold)."""
        raise NotImplementedError

    def prediction(self, bag: Bag, output: np.ndarray | None) -> dict:
        """A predictions.csv row's task columns for a bag (``output`` None: not tested)."""
        raise NotImplementedError

    def val_metrics(self, val: list[Bag], outputs: np.ndarray) -> dict:
        """Extra per-epoch validation figures for history.csv (default: none)."""
        return {}

    def monitor(self, row: dict) -> float:
        """What early stopping minimises, from an epoch's history row (default: the validation loss)."""
        return row["val_loss"]

    def write_plots(self, out_dir, bags: list[Bag], outputs: list) -> dict:
        """Task plots of the out-of-fold outputs into the run folder; returns figures for summary.json."""
        return {}

    def describe(self) -> dict:
        """What summary.json and each checkpoint record of the task (its classes, intervals, loss)."""
        return {"task": self.name}

    def restore(self, described: dict) -> Task:
        """This task with a fold's fitted state back from a checkpoint's :meth:`describe` (default: none)."""
        return self

    def ensemble_output(self, outputs: np.ndarray) -> np.ndarray:
        """What the fold models' outputs of one bag are averaged as (default: the outputs themselves)."""
        return outputs[0]

    def ensemble_columns(self) -> list[str]:
        """predict's columns for a bag's ensemble output."""
        return self.output_columns()

    def ensemble_row(self, output: np.ndarray | None) -> dict:
        """predict's cells for a bag's averaged output (None: no prediction)."""
        raise NotImplementedError

    def ensemble_metrics(self, bags: list[Bag], outputs: np.ndarray) -> dict:
        """``{name: metric(indices)}`` over a cohort's ensemble outputs (what predict writes), for
        ``wsi-mil evaluate`` to give each a bootstrap interval over patients."""
        raise NotImplementedError

    def evaluation_plots(self, out_dir, bags: list[Bag], outputs: np.ndarray, groups: np.ndarray, n_boot: int,
                         seed: int) -> dict:
        """The task's evaluation plots into ``out_dir``; figures for metrics.json (default: none)."""
        return {}

    def operating_threshold(self, bags: list[Bag], outputs: list[np.ndarray], rule: str) -> dict:
        """The run's operating threshold (``train.threshold``) picked on the out-of-fold outputs of ``bags``
        for summary.json; {} where the task has none (default)."""
        return {}

    def with_threshold(self, threshold: dict) -> Task:
        """This task calling its predictions at a run's threshold (default: nothing to call)."""
        return self

    def map_view(self, output: np.ndarray) -> MapView:
        """A bag's averaged output as the heatmap shows it (default: one value, e.g. a risk; one map)."""
        (name,) = self.ensemble_columns()
        value = float(output[0])
        return MapView(f"{name}: {value:.3g}", {name: value}, [], name, f"{value:.3g}")


def task_from_checkpoint(meta) -> Task:
    """A fold's task as it was trained, from a checkpoint's metadata (its run config and ``describe()``);
    checkpoints from before tasks are classification."""
    from ...config import TrainConfig

    train = dict((meta.config or {}).get("train") or {})
    tcfg = TrainConfig.model_validate(train) if train else TrainConfig()
    return task_class(tcfg.task)(meta.label_map, tcfg).restore(meta.task or {})


def parse_rows(rows: list[dict], name: str, parse_row, problem: str) -> list[dict]:
    """``parse_row(row)`` for every labels row (None: a bad row), or one error line naming the CSV lines
    whose rows are bad (line 2 is the first row): ``<csv>: <problem> on line(s) 3, 7``."""
    from ..survival import lines_text

    out, bad = [], []
    for line, r in enumerate(rows, start=2):
        fields = parse_row(r)
        if fields is None:
            bad.append(line)
        out.append(fields)
    if bad:
        raise WsiMilError(f"{name}: {problem} on line(s) {lines_text(bad)}")
    return out


def check_finite(values: np.ndarray, what: str) -> np.ndarray:
    """Non-finite numbers are an error, never a prediction."""
    if not np.isfinite(values).all():
        raise WsiMilError(f"{what}: the model gave a non-finite output (NaN or inf); not written as a prediction")
    return values
