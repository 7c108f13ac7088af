"""Generic batch runner: every stage's batch, resume, locking, progress and executor logic."""

from .base import Executor
from .cache import per_process
from .core import BatchResult, Task, run_batch, run_task
from .executors import ProcessExecutor, SerialExecutor, make_executor
from .locks import SlideLock
from .manifest import Record, read_manifest, update_manifest

__all__ = ["BatchResult", "Executor", "ProcessExecutor", "Record", "SerialExecutor", "SlideLock", "Task",
           "make_executor", "per_process", "read_manifest", "run_batch", "run_task", "update_manifest"]
