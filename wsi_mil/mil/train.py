"""Fit one MIL head through the generic contract (``forward`` -> ``compute_loss``): Adam/AdamW, one bag per
step by default, class-weighted loss or balanced sampling, early stopping on validation loss (patience +
minimum epochs) keeping the best weights, bf16 autocast (CUDA, and CPUs with native bf16). Bags stream through a
:class:`~wsi_mil.mil.data.BagCache`. Deterministic for a given seed on a given device."""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from ..config import ModelConfig, TrainConfig
from ..device import native_bf16
from ..runner.memory import heap_for_steps
from .data import Bag, BagCache, BagDataset, pad_batch
from .ddp import all_sum, rank_and_world, shard, wrap
from .models import build_model


@dataclass
class FitResult:
    model: nn.Module
    best_epoch: int
    history: list[dict] = field(default_factory=list)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed)


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def _order(labels: np.ndarray, balance: str, gen: torch.Generator, n_classes: int) -> torch.Tensor:
    n = len(labels)
    if balance == "sampler":  # draw bags with probability inverse to their class frequency
        w = class_weights(labels, n_classes)[torch.as_tensor(labels)]
        return torch.multinomial(w, n, replacement=True, generator=gen)
    return torch.randperm(n, generator=gen)


class _EpochOrder(Sampler):
    """Yields ``(index, epoch)`` in an order set before each epoch (works with persistent workers)."""

    def __init__(self):
        self.order: list[int] = []
        self.epoch = 0

    def __iter__(self):
        return iter([(i, self.epoch) for i in self.order])

    def __len__(self) -> int:
        return len(self.order)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast (``train.amp``) on CUDA, and on a CPU that computes bf16 natively (AVX512-BF16 / AMX;
    :func:`wsi_mil.device.native_bf16`): measured there 2.1x faster per clam_sb step with the same
    cross-validated metrics (docs/benchmarks.md). Elsewhere on the CPU, fp32: emulated bf16 is slower."""
    on = device.type == "cuda" or (device.type == "cpu" and native_bf16())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and on)


def _to(coords: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if coords is None else coords.to(device)


@torch.no_grad()
def predict_bags(model: nn.Module, bags: list[Bag], batch_size: int = 1, device="cpu",
                 cache: BagCache | None = None, amp: bool = True, task=None) -> tuple[np.ndarray, float]:
    """Class probabilities (n, C) and the mean bag cross-entropy (nan for no bags); with a ``task`` other
    than classification, its outputs (n, K) and its bag loss over all the bags at once (Cox compares them)."""
    device = torch.device(device)
    model.eval()
    cache = cache or BagCache(0)
    ds = BagDataset(bags, cache)
    if task is not None and not task.uses_class_weight:
        return _task_outputs(model, ds, batch_size, device, amp, task)
    probs, losses = [], []
    for i in range(0, len(bags), batch_size):
        x, mask, y, coords = pad_batch([ds[j] for j in range(i, min(i + batch_size, len(bags)))])
        with autocast(device, amp):
            out = model(x.to(device), mask.to(device), _to(coords, device))
        logits = out.logits.float()
        probs.append(torch.softmax(logits, 1).cpu())
        losses.append(nn.functional.cross_entropy(logits, y.to(device), reduction="sum").item())
    p = torch.cat(probs).numpy() if probs else np.zeros((0, 0))
    return p, (sum(losses) / len(bags)) if losses and len(bags) else math.nan


def _task_outputs(model, ds: BagDataset, batch_size: int, device, amp: bool, task) -> tuple[np.ndarray, float]:
    logits, targets = [], []
    for i in range(0, len(ds), batch_size):
        x, mask, y, coords = pad_batch([ds[j] for j in range(i, min(i + batch_size, len(ds)))])
        with autocast(device, amp):
            logits.append(model(x.to(device), mask.to(device), _to(coords, device)).logits.float().cpu())
        targets.append(y)
    if not logits:
        return np.zeros((0, 0)), math.nan
    z, y = torch.cat(logits), torch.cat(targets)
    return task.outputs(z).numpy(), float(task.bag_loss(z, y))


class WithLoss(nn.Module):
    """A head and its loss as one module, so DDP sees every parameter the loss uses (CLAM's instance
    classifiers, ...) in its forward pass. The head runs under autocast (``amp``), the loss in fp32."""

    def __init__(self, model: nn.Module, amp: bool):
        super().__init__()
        self.model, self.amp = model, amp

    def forward(self, x, mask, coords, y, weight=None, bag_loss=None) -> torch.Tensor:
        with autocast(x.device, self.amp):
            out = self.model(x, mask, coords)
        return self.model.compute_loss(out, y, weight, bag_loss)["loss"]


def _epoch(net: nn.Module, loader, opt, accumulate: int, weight, bag_loss, device) -> tuple[float, int]:
    """One pass over this rank's bags; an optimizer step every ``accumulate`` batches (and after the
    last), on the mean of their losses. Under DDP, gradients are averaged over ranks at each step only.
    Returns this rank's summed bag loss and bag count."""
    steps = len(loader)
    total, seen = 0.0, 0
    opt.zero_grad(set_to_none=True)
    for b, (x, mask, y, coords) in enumerate(loader):
        first = b - b % accumulate
        group, stepping = min(accumulate, steps - first), b + 1 == min(first + accumulate, steps)
        sync = contextlib.nullcontext() if stepping or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            loss = net(x.to(device, non_blocking=True), mask.to(device), _to(coords, device), y.to(device), weight,
                       bag_loss)
            (loss / group).backward()
        if stepping:
            opt.step()
            opt.zero_grad(set_to_none=True)
        total += loss.item() * len(y)
        seen += len(y)
    return total, seen


def make_optimizer(model: nn.Module, tcfg: TrainConfig, fused: bool = True) -> torch.optim.Optimizer:
    """Adam or AdamW (``train.optimizer``) with the recipe's lr, weight decay and betas, run by PyTorch's
    fused kernel (one call over every parameter, on CPU and CUDA) where the parameters allow it, else by
    its per-tensor loop (the CPU default). The update is the same; on classical-MIL bags, where a step
    is a few small matrices, the per-tensor loop was a third of the step (docs/benchmarks.md).
    ``fused=False`` asks for the per-tensor loop (the benchmark's baseline)."""
    cls = torch.optim.AdamW if tcfg.optimizer == "adamw" else torch.optim.Adam
    params = list(model.parameters())
    kwargs = {"lr": tcfg.lr, "weight_decay": tcfg.weight_decay, "betas": tuple(tcfg.betas)}
    if fused and params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return cls(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # a torch without the fused kernel for this device or dtype
            pass
    return cls(params, **kwargs)


def fit(train: list[Bag], val: list[Bag], in_dim: int, n_classes: int, mcfg: ModelConfig, tcfg: TrainConfig,
        seed: int, device="cpu", progress: bool = False, cache: BagCache | None = None, task=None) -> FitResult:
    """Fit one head. ``task`` (:mod:`wsi_mil.mil.tasks`) other than classification gives the output width
    (``n_classes`` is then ignored) and the bag loss; class weights and balanced sampling are for classes."""
    device = torch.device(device)
    gen = seed_everything(seed)
    by_class = task is None or task.uses_class_weight
    model = build_model(mcfg, in_dim, n_classes if by_class else task.out_dim()).to(device)
    opt = make_optimizer(model, tcfg)
    labels = np.array([b.label for b in train])
    balance = tcfg.balance if by_class else "none"
    weight = class_weights(labels, n_classes).to(device) if balance == "weighted_loss" else None
    bag_loss = None if by_class else task.bag_loss
    workers = tcfg.num_workers
    cache = cache or BagCache.from_config(tcfg, share=max(1, workers))
    sampler = _EpochOrder()
    loader = DataLoader(BagDataset(train, cache, tcfg.max_instances, seed), batch_size=tcfg.batch_size,
                        sampler=sampler, collate_fn=pad_batch, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    loop = _Loop(model, wrap(WithLoss(model, tcfg.amp)), loader, sampler, opt, tcfg, labels, balance, gen, n_classes,
                 weight, bag_loss, device, cache, task, val, progress)
    with heap_for_steps():  # the steps' activation blocks stay on the heap (see runner.memory)
        best, history = _epochs(loop)
    model.load_state_dict(best[2])
    model.eval()
    return FitResult(model, best[1], history)


@dataclass
class _Loop:
    """What the epochs of one :func:`fit` share."""

    model: nn.Module
    net: nn.Module  # model + loss, DDP-wrapped under torchrun
    loader: DataLoader
    sampler: _EpochOrder
    opt: torch.optim.Optimizer
    tcfg: TrainConfig
    labels: np.ndarray
    balance: str
    gen: torch.Generator
    n_classes: int
    weight: torch.Tensor | None
    bag_loss: object
    device: torch.device
    cache: BagCache
    task: object
    val: list[Bag]
    progress: bool


def _epochs(loop: _Loop) -> tuple[tuple, list[dict]]:
    """Train, validate, keep the best weights, stop early. Returns ((monitor, epoch, weights) of the best
    epoch, history)."""
    t, model, task, val = loop.tcfg, loop.model, loop.task, loop.val
    best = (math.inf, 0, copy.deepcopy(model.state_dict()))
    history, stale = [], 0
    rank, world = rank_and_world()
    epochs = tqdm(range(1, t.epochs + 1), desc="epochs", leave=False, disable=not loop.progress or rank > 0)
    for epoch in epochs:
        t0 = time.perf_counter()
        model.train()
        loop.sampler.order = shard(_order(loop.labels, loop.balance, loop.gen, loop.n_classes).tolist(), rank, world)
        loop.sampler.epoch = epoch
        total, seen = _epoch(loop.net, loop.loader, loop.opt, t.accumulate, loop.weight, loop.bag_loss, loop.device)
        total, seen = all_sum([total, seen])
        row = {"epoch": epoch, "train_loss": total / max(seen, 1), "seconds": time.perf_counter() - t0}
        if val:
            outs, row["val_loss"] = predict_bags(model, val, device=loop.device, cache=loop.cache, amp=t.amp, task=task)
            if task is not None:
                row.update(task.val_metrics(val, outs))
        history.append(row)
        monitor = (task.monitor(row) if task is not None else row["val_loss"]) if val else -epoch  # no val: the last
        if monitor < best[0] - 1e-6:
            best, stale = (monitor, epoch, copy.deepcopy(model.state_dict())), 0
        else:
            stale += 1
        epochs.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row.get('val_loss', math.nan):.3f}")
        if epoch >= t.min_epochs and stale >= t.patience:
            break
    return best, history
