"""Run an encoder over a slide's patches: device choice, AMP, channels_last, and a DataLoader that keeps
slide decoding in worker processes, behind the model's compute."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import EncoderConfig, ExtractConfig
from ..device import cpu_precision, pick_device
from ..runner.cache import per_process
from ..runner.lifetime import end_with
from .dataset import PatchDataset, collate_batch
from .encoders import Encoder, build_encoder

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_precision(name: str, device: torch.device, encoder: Encoder) -> str:
    """``auto``: on CUDA the precision the encoder's authors run it in (its preset's); on the CPU, bf16
    where the authors run bf16 and the CPU computes it natively (:func:`~wsi_mil.device.cpu_precision`),
    else fp32 (an fp16 preset is not run in bf16's shorter mantissa); fp32 on other devices."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return encoder.gpu_precision
    if device.type == "cpu" and encoder.gpu_precision == "bf16":
        return cpu_precision("auto")
    return "fp32"


def auto_batch_size(device: torch.device) -> int:
    return 256 if device.type == "cuda" else 32


def auto_workers(device: torch.device) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cpu":
        return min(2, cores)  # measured best on 2 cores (docs/benchmarks.md); decoding is light next to the model
    return max(1, min(8, cores - 1))


def worker_context():
    """DataLoader workers fork from a clean forkserver (torch, cv2, our reader preloaded), never from this
    process: forking a process whose OpenMP/OpenCV thread pools have run can deadlock the child."""
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "cv2", "wsi_mil.features.dataset"])
    return ctx


def _worker_init(main: int, _worker_id: int) -> None:
    """Decoding workers take one thread each and end with the extracting process ``main`` (their parent
    is the fork server, which outlives a ``kill -9`` of it: :mod:`wsi_mil.runner.lifetime`)."""
    end_with(main)
    torch.set_num_threads(1)  # decoding workers must not fight the model for cores
    import cv2

    cv2.setNumThreads(1)


@dataclass
class Prepared:
    """An encoder on its device with its normalisation, ready for uint8 NHWC batches."""

    encoder: Encoder
    device: torch.device
    precision: str
    mean: torch.Tensor
    std: torch.Tensor
    model: torch.nn.Module

    @classmethod
    def create(cls, encoder: Encoder, cfg: ExtractConfig) -> Prepared:
        device = pick_device(cfg.device)
        precision = pick_precision(cfg.precision, device, encoder)
        model = encoder.model.to(device).eval()
        if device.type in ("cuda", "cpu"):
            model = model.to(memory_format=torch.channels_last)
        if cfg.compile:
            model = torch.compile(model)
        mean = torch.tensor(encoder.mean, device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(encoder.std, device=device).view(1, 3, 1, 1) * 255
        return cls(encoder, device, precision, mean, std, model)

    def forward_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) on any device -> float32 features (B, D) on the device."""
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        enabled = self.precision != "fp32"
        with torch.autocast(self.device.type, dtype=DTYPES[self.precision], enabled=enabled):
            return self.model(x).float()


def extract_patches(prep: Prepared, dataset: PatchDataset, cfg: ExtractConfig,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, D) in dataset order, and the indices of patches that could not be decoded."""
    n = len(dataset)
    feats = np.zeros((n, prep.encoder.dim), np.float32)
    bad: list[np.ndarray] = []
    if n == 0:
        return feats, np.zeros(0, np.int64)
    batch = cfg.batch_size or auto_batch_size(prep.device)
    workers = auto_workers(prep.device) if cfg.num_workers < 0 else cfg.num_workers
    loader = DataLoader(
        dataset, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=collate_batch,
        pin_memory=prep.device.type == "cuda", worker_init_fn=partial(_worker_init, os.getpid()) if workers else None,
        prefetch_factor=4 if workers else None, persistent_workers=False,
        multiprocessing_context=worker_context() if workers else None,
    )
    with torch.inference_mode(), tqdm(total=n, unit="patch", disable=not progress, leave=False) as bar:
        for b in loader:
            idx = b["index"].numpy()
            feats[idx] = prep.forward_uint8(b["image"]).cpu().numpy()
            if b["bad"].any():
                bad.append(idx[b["bad"].numpy()])
            bar.update(len(idx))
    return feats, (np.concatenate(bad) if bad else np.zeros(0, np.int64))


def prepared_encoder(encoder: EncoderConfig, extract: ExtractConfig) -> Prepared:
    """The configured encoder on its device, built once per process and reused for every slide."""
    key = encoder.model_dump_json() + extract.model_dump_json(include={"device", "precision", "compile"})
    return per_process("encoder", key, lambda: Prepared.create(build_encoder(encoder), extract))
