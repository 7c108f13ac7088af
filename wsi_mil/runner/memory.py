"""glibc allocator settings for the two memory patterns of the pipeline (no-ops elsewhere).

- Tiling allocates and frees a few 8-24 MB images per slide (thumbnail, HSV, masks, labels). By default
  glibc serves such blocks with fresh mmaps and trims freed heap at once, so every slide pays the page
  faults again. :func:`reuse_large_blocks` keeps blocks up to 32 MB on the heap and up to 512 MB of freed
  heap for reuse: measured 0.44-0.50 s -> 0.37-0.40 s for the tile stage on a 100k x 80k slide.
- A MIL bag cache evicts whole bags: :func:`large_blocks_from_mmap` serves blocks >= 1 MiB with mmap so
  an evicted bag goes back to the system instead of staying in a fragmented heap.
"""

from __future__ import annotations

import ctypes
from functools import cache

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


def _mallopt(option: int, value: int) -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(option, value)


def reuse_large_blocks() -> None:
    _mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest allowed threshold on 64-bit
    _mallopt(M_TRIM_THRESHOLD, 512 << 20)


def large_blocks_from_mmap() -> None:
    _mallopt(M_MMAP_THRESHOLD, 1 << 20)
