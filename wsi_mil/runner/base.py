"""The executor interface every stage runs through, and the machine's GPUs (shared by all executors)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any


class Executor(ABC):
    """Map ``fn`` over ``items``; yield ``(item, result)`` in completion order.

    ``on_lost(item, reason)`` makes the result for an item whose worker died ``retries`` times.
    """

    @abstractmethod
    def imap(self, fn: Callable, items: Iterable, on_lost: Callable[[Any, str], Any]) -> Iterator[tuple[Any, Any]]:
        ...

    def close(self) -> None:  # noqa: B027 - optional hook; most executors hold nothing
        """Release workers or cluster connections (nothing by default)."""


def local_gpus() -> list[int]:
    """CUDA device indices on this machine (empty without torch or CUDA)."""
    try:
        import torch

        return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    except ImportError:
        return []
