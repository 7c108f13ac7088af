"""Executors run a picklable per-task function over items and yield results as they finish.

Stages never see which executor runs them. ``serial`` and ``process`` are built in; ``dask`` lives in
:mod:`wsi_mil.runner.dask_executor` and is imported only when asked for. The interface is in
:mod:`wsi_mil.runner.base`, so neither module imports the other's internals.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from .base import Executor, local_gpus
from .lifetime import end_with


class SerialExecutor(Executor):
    def imap(self, fn, items, on_lost):
        for item in items:
            yield item, fn(item)


def _init_worker(parent: int, queue=None) -> None:
    """Pool initializer: end with the batch's process (:mod:`.lifetime`), and with a GPU queue, give this
    worker one GPU before anything initialises CUDA."""
    end_with(parent)
    if queue is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(queue.get())


_QUIET_TRACKER = "ignore:resource_tracker:UserWarning"


def _quiet_resource_tracker() -> None:
    """A worker killed mid-task leaves the pool's semaphores to multiprocessing's resource tracker, which
    would warn about them at exit; the lost task is already retried or reported, so the tracker (started
    with this interpreter's warning options) stays quiet."""
    if _QUIET_TRACKER not in sys.warnoptions:
        sys.warnoptions.append(_QUIET_TRACKER)


class ProcessExecutor(Executor):
    """A local process pool (spawned, so no forked threads or slide handles). Dead workers are retried.

    With ``gpus``, there is one worker per GPU and each sees only its own device, so slides are
    shared out between GPUs and no device is oversubscribed.
    """

    def __init__(self, workers: int, retries: int = 2, gpus: list[int] | None = None):
        self.gpus = list(gpus) if gpus else None
        self.workers = len(self.gpus) if self.gpus else max(1, workers)
        self.retries = retries

    def _pool(self, n: int):
        _quiet_resource_tracker()
        ctx = mp.get_context("spawn")
        if not self.gpus:
            return ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_init_worker,
                                       initargs=(os.getpid(),))
        queue = ctx.Queue()  # handed over when each worker is spawned; no manager process to outlive us
        for gpu in self.gpus:
            queue.put(gpu)
        return ProcessPoolExecutor(max_workers=len(self.gpus), mp_context=ctx, initializer=_init_worker,
                                   initargs=(os.getpid(), queue))

    def imap(self, fn, items, on_lost):
        pending = list(items)
        tries = {id(i): 0 for i in pending}
        while pending:
            with self._pool(min(self.workers, len(pending))) as pool:
                futures = {pool.submit(fn, item): item for item in pending}
                pending = []
                try:
                    while futures:
                        done, _ = wait(futures, return_when=FIRST_COMPLETED)
                        for fut in done:
                            item = futures.pop(fut)
                            try:
                                yield item, fut.result()
                            except BrokenProcessPool:
                                tries[id(item)] += 1
                                if tries[id(item)] > self.retries:
                                    yield item, on_lost(item, f"worker process died {tries[id(item)]} times")
                                else:
                                    pending.append(item)
                except BaseException:  # Ctrl-C, or the batch stopped reading: stop now, not after every slide
                    _stop(pool)
                    raise


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel the slides not started and end the workers at once: the pool's own exit would wait for every
    slide already submitted (all of them), so Ctrl-C on a batch went on for the whole batch. A slide cut
    off is redone on the next run, as after a crash."""
    stop = getattr(pool, "terminate_workers", None)  # Python 3.14+: terminates, then shuts the pool down
    if stop is not None:
        stop()
        return
    procs = list((getattr(pool, "_processes", None) or {}).values())  # the pool forgets them on shutdown
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        proc.terminate()


def make_executor(kind: str, workers: int = 0, retries: int = 2, dask_address: str | None = None,
                  resources: dict | None = None) -> Executor:
    gpus = local_gpus() if resources and "GPU" in resources else []
    if kind == "serial" and len(gpus) > 1:
        kind = "process"  # several GPUs: one process per GPU, slides shared out between them
    if kind == "serial":
        return SerialExecutor()
    if kind == "process":
        if gpus:
            return ProcessExecutor(0, retries, gpus=gpus[:workers] if workers else gpus)
        return ProcessExecutor(workers or max(1, mp.cpu_count()), retries)
    if kind == "dask":
        from .dask_executor import DaskExecutor

        return DaskExecutor(address=dask_address, workers=workers, retries=retries, resources=resources)
    raise ValueError(f"unknown executor '{kind}'")
