"""One cross-validation fit as a picklable task, so the train stage can run its (model, fold) fits on any
executor: in this process, a local process pool or a Dask cluster.

A task carries everything it needs (the bags by file, the config, the split) and returns the fitted
weights, their metadata, the history and the fold's test outputs; it writes nothing, so only the driver
writes the run and swaps it in whole. Each worker keeps one :class:`~wsi_mil.mil.data.BagCache` for the
train call that sent the task (its ``token``), so a worker fitting several folds reads each bag once, and
a later train call never sees bags cached from files that have since been rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import Config, config_to_dict
from ..device import pick_device
from .checkpoint import CheckpointMeta, state_of
from .data import BagCache, BagSet
from .tasks import Task, check_finite, task_class
from .train import fit, predict_bags

_CACHE: dict[str, BagCache] = {}  # token -> this process's cache for that train call (one at a time)


def use_cache(token: str, cache: BagCache) -> None:
    """Make ``cache`` the bag cache of tasks with ``token`` in this process (the driver's own, when tasks
    run in it), dropping any other train call's."""
    _CACHE.clear()
    _CACHE[token] = cache


def worker_cache(token: str, cfg: Config) -> BagCache:
    cache = _CACHE.get(token)
    if cache is None:
        use_cache(token, BagCache.from_config(cfg.train, share=max(1, cfg.train.num_workers)))
        cache = _CACHE[token]
    return cache


def make_task(data: BagSet, cfg: Config) -> Task:
    return task_class(cfg.train.task)(data.label_map, cfg.train)


@dataclass(frozen=True)
class FoldSpec:
    """One (model, fold) fit: ``cfg`` names one model and its run; ``split`` is (train, val, test) indices
    into ``data.bags``; ``index`` orders the task among all the fits of one train call."""

    data: BagSet
    cfg: Config
    fold: int
    split: tuple[np.ndarray, np.ndarray, np.ndarray]
    token: str
    index: int = 0
    progress: bool = False  # epoch bars (for fits that run in the driver's own process)


@dataclass
class FoldFit:
    fold: int
    state: dict[str, torch.Tensor]
    meta: CheckpointMeta
    history: list[dict] = field(default_factory=list)
    test_outputs: np.ndarray | None = None  # (n_test, K) in the order of split[2]
    metrics: dict | None = None  # the fold's test metrics (None without a test share)


def fit_fold(spec: FoldSpec) -> FoldFit:
    """Fit one fold (seed ``train.seed + fold``), then score its test share with the fold's task."""
    data, cfg, (tr, va, te) = spec.data, spec.cfg, spec.split
    t = cfg.train
    task = make_task(data, cfg)
    ftask = task.for_fold([data.bags[i] for i in tr])
    fbags = ftask.fold_bags(data.bags)
    device, cache = pick_device(t.device), worker_cache(spec.token, cfg)
    res = fit([fbags[i] for i in tr], [fbags[i] for i in va], data.feature_dim, len(data.label_map), cfg.model, t,
              seed=t.seed + spec.fold, device=device, progress=spec.progress, cache=cache, task=ftask)
    meta = CheckpointMeta(config_to_dict(cfg.model), data.label_map, data.feature_dim, data.encoder_id, spec.fold,
                          res.best_epoch, config_to_dict(cfg), ftask.out_dim(), ftask.describe())
    out = FoldFit(spec.fold, state_of(res.model), meta, [{"fold": spec.fold, **h} for h in res.history])
    if len(te):
        outputs, _ = predict_bags(res.model, [fbags[i] for i in te], device=device, cache=cache, amp=t.amp,
                                  task=ftask)
        check_finite(outputs, f"fold {spec.fold}")
        out.test_outputs = outputs
        out.metrics = {"fold": spec.fold, "best_epoch": res.best_epoch, **ftask.describe(),
                       **ftask.metrics([data.bags[i] for i in te], outputs, [data.bags[i] for i in tr])}
    return out
