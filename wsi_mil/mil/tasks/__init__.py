"""MIL tasks (``train.task``): each file registers one; see :mod:`.base` for the contract."""

from . import classification, multilabel, regression, survival  # noqa: F401  (each registers its task)
from .base import TASKS, Task, check_finite, task_class, task_from_checkpoint

__all__ = ["TASKS", "Task", "check_finite", "task_class", "task_from_checkpoint"]
