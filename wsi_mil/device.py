"""Where tensors run and at what precision: one choice shared by extract, predict and heatmap."""

from __future__ import annotations

import functools

import torch

from .errors import WsiMilError


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: cuda, then mps, then cpu. Asking for a device that is not there is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise WsiMilError("device=cuda but no CUDA device is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise WsiMilError("device=mps but no Apple MPS device is available")
    return torch.device(name)


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (the ``avx512_bf16`` or ``amx_bf16`` flag), where bf16 is
    faster. oneDNN's own check also says yes on AVX-512 CPUs without them, where bf16 is emulated and
    slower, so the flags decide where the kernel lists them (Linux); elsewhere, no."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def cpu_precision(name: str) -> str:
    """``auto`` on the CPU: bf16 only where the CPU has it natively (elsewhere it is many times slower)."""
    if name != "auto":
        return name
    return "bf16" if native_bf16() else "fp32"
