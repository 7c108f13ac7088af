"""Data-parallel training within one fit: ``torch.distributed`` with DistributedDataParallel (Li et al.,
"PyTorch Distributed", VLDB 2020): every rank holds the same model, reads its own share of each epoch's
bags and averages its gradients with the others' after each backward pass, so all ranks take the same
optimizer step. NCCL on GPUs, gloo on CPU.

A step of ``W`` ranks with one bag each is the step of one process that accumulates the same ``W`` bags
(``train.accumulate``): the mean of the ``W`` per-bag gradients either way. The epoch's bag order is
drawn from the same seed on every rank, padded to a multiple of ``W`` by repeating its first bags (as
torch's DistributedSampler does), and rank ``r`` takes every ``W``-th bag from ``r``.

Started by ``wsi-mil train --nproc N`` (ranks spawned on this machine) or by ``torchrun``, whose
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` are read by :func:`init_from_env`.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from ..errors import WsiMilError


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0, or without a process group: the one process that writes."""
    return rank_and_world()[0] == 0


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` or ``--nproc`` describes in the environment (a no-op
    without ``WORLD_SIZE`` > 1, or when joined already); True when there is one to join."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    if dist.is_initialized():
        return True
    if not dist.is_available():
        raise WsiMilError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def shard(order: list[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s bags of an epoch's ``order``: padded to a multiple of ``world`` by repeating its
    first bags, then every ``world``-th from ``rank``."""
    if world == 1 or not order:
        return order
    padded = order + order[: (-len(order)) % world]
    return padded[rank::world]


def wrap(model: nn.Module) -> nn.Module:
    """The model under DDP when there is a process group of more than one rank, else itself. Parameters
    that only a loss term uses, or that a bag leaves unused, are allowed (``find_unused_parameters``)."""
    if rank_and_world()[1] == 1:
        return model
    device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def all_sum(values: list[float]) -> list[float]:
    """The sums over ranks of a few numbers (an epoch's loss and bag count), or themselves alone."""
    if rank_and_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, fn, args: tuple) -> None:
    """One spawned rank: the environment torchrun would give it, then ``fn(*args)``; its exit status."""
    import sys

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if rank > 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - rank 0 reports; the others' errors still show
    code = fn(*args)
    if dist.is_initialized():
        dist.destroy_process_group()
    if code:
        sys.exit(code)


def launch(nproc: int, fn, *args) -> int:
    """Run ``fn(*args)`` in ``nproc`` spawned ranks on this machine (a process group on 127.0.0.1, as
    ``torchrun --standalone`` would make); a rank that fails stops the others. The first non-zero exit
    status, or 0."""
    import torch.multiprocessing as mp

    # DDP's C++ reducer warns, once per rank, when find_unused_parameters finds every parameter used (most
    # heads; some leave parameters unused, so it stays on); set TORCH_CPP_LOG_LEVEL yourself to see it
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    try:
        mp.spawn(_rank, args=(nproc, _free_port(), fn, args), nprocs=nproc, join=True)
    except mp.ProcessExitedException as exc:
        return exc.exit_code or 1
    except mp.ProcessRaisedException:
        return 1
    return 0
