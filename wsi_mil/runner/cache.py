"""One heavy object per process (an encoder on its device, a fold ensemble), rebuilt when its key changes."""

from __future__ import annotations

from collections.abc import Callable

_PROCESS_CACHE: dict[str, tuple[str, object]] = {}


def per_process(name: str, key: str, build: Callable[[], object]):
    """The object cached under ``name`` for ``key``; a new key frees the old object before building."""
    hit = _PROCESS_CACHE.get(name)
    if hit is None or hit[0] != key:
        _PROCESS_CACHE.pop(name, None)
        _PROCESS_CACHE[name] = (key, build())
    return _PROCESS_CACHE[name][1]
