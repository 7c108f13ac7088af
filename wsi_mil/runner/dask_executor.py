"""Dask distributed executor: the same per-slide tasks on a LocalCluster, or on any cluster by address
(SLURM through dask-jobqueue, Kubernetes, ...). Needs the ``wsi_mil[distributed]`` extra.

- Without an address a LocalCluster starts: ``workers`` CPU worker processes, or, for GPU stages on a
  machine with GPUs, one worker per GPU holding a ``GPU`` resource and seeing only its own device.
- A worker that dies mid-slide has its task rescheduled on another worker; after ``retries`` deaths the
  slide is recorded as failed (``distributed.scheduler.allowed-failures``).
- Tasks write through the same atomic outputs, locks and manifest as a local run, so results are
  identical to a serial run's.
"""

from __future__ import annotations

import logging
import os
import uuid

from ..errors import WsiMilError, one_line
from .base import Executor, local_gpus


def _pin(dask_worker=None, mapping: dict | None = None) -> None:
    gpu = (mapping or {}).get(dask_worker.address)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)


class DaskExecutor(Executor):
    def __init__(self, address: str | None = None, workers: int = 0, retries: int = 2,
                 resources: dict | None = None):
        try:
            import dask
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise WsiMilError("runner.executor=dask needs the distributed extra: pip install 'wsi_mil[distributed]'") from None
        # a worker holds only the slide it is running, so a dying worker takes no queued slide down with it
        dask.config.set({"distributed.scheduler.allowed-failures": retries,
                         "distributed.scheduler.worker-saturation": 1.0})
        self.cluster = None
        self.resources = None
        if address:
            try:
                self.client = Client(address, timeout="20s")
            except OSError as exc:
                raise WsiMilError(f"cannot reach the Dask scheduler at {address}: {one_line(exc)}") from None
            info = self.client.scheduler_info().get("workers", {})
            if resources and any("GPU" in w.get("resources", {}) for w in info.values()):
                self.resources = resources  # only ask for GPUs the cluster advertises
            return
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:  # the in-process scheduler's INFO lines
            logging.getLogger("distributed").setLevel(logging.WARNING)
        gpus = local_gpus() if resources and "GPU" in resources else []
        n = len(gpus) if gpus else (workers or os.cpu_count() or 1)
        # CRITICAL: a worker's heartbeat racing the scheduler's shutdown logs a traceback at ERROR; task errors
        # and lost workers reach us through the futures, so nothing a user needs is in those lines
        self.cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                                    silence_logs=logging.CRITICAL, resources={"GPU": 1} if gpus else None)
        self.client = Client(self.cluster)
        if gpus:
            mapping = dict(zip(sorted(self.client.scheduler_info()["workers"]), gpus))
            self.client.run(_pin, mapping=mapping)
            self.resources = {"GPU": 1}

    def imap(self, fn, items, on_lost):
        from dask.distributed import as_completed

        items = list(items)
        run = uuid.uuid4().hex[:8]
        futures = {}
        for i, item in enumerate(items):
            fut = self.client.submit(fn, item, key=f"wsi-mil-{run}-{i}", pure=False, resources=self.resources)
            futures[fut] = item
        for fut in as_completed(futures):
            item = futures[fut]
            try:
                yield item, fut.result()
            except Exception as exc:  # KilledWorker after too many worker deaths, lost connections
                yield item, on_lost(item, f"worker failed: {one_line(exc)}")

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()
