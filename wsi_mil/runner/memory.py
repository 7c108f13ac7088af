"""glibc allocator settings for the memory patterns of the pipeline (no-ops elsewhere), and memory of its own
for what must go back to the system when freed.

- Tiling allocates and frees a few 8-24 MB images per slide (thumbnail, HSV, masks, labels). By default
  glibc serves such blocks with fresh mmaps and trims freed heap at once, so every slide pays the page
  faults again. :func:`reuse_large_blocks` keeps blocks up to 32 MB on the heap and up to 512 MB of freed
  heap for reuse: measured 0.44-0.50 s -> 0.37-0.40 s for the tile stage on a 100k x 80k slide.
- A MIL training step allocates and frees the same activation blocks every step (on a 20,000-instance
  bag, 20-80 MB each). glibc serves blocks over 32 MB (over 1 MiB when the threshold is pinned there)
  with fresh mmaps, so every step pays the kernel's page faults and zeroing again. Inside
  :func:`heap_for_steps` nothing is mmapped and freed heap is kept: measured per clam_sb step (20,000 x
  1024, 2 cores, one run): 880 ms with the threshold pinned at 1 MiB, 679 ms with glibc's defaults (as
  in CLAM's process), 606 ms inside (docs/benchmarks.md, issue 23).
- A MIL bag cache evicts whole bags: each cached bag lives in its own anonymous mapping
  (:func:`mapped_empty`), so an evicted bag goes back to the system whatever the malloc settings.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
from functools import cache

import numpy as np

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
GLIBC_MMAP_MAX = 65536  # glibc's default count of mmapped blocks


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


@contextlib.contextmanager
def heap_for_steps():
    """Every block from the heap, and freed heap kept, while training steps run; on exit glibc mmaps
    large blocks again and the heap is trimmed back to what is in use."""
    _mallopt(M_MMAP_MAX, 0)
    _mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        _mallopt(M_MMAP_MAX, GLIBC_MMAP_MAX)
        _mallopt(M_TRIM_THRESHOLD, 128 << 10)  # glibc's default
        libc = _libc()
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def mapped_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array in an anonymous mapping of its own: when the last reference goes, the
    mapping is unmapped and its memory is the system's again (no heap fragmentation keeps it)."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    if size == 0:
        return np.empty(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, size), dtype=dtype).reshape(shape)
