"""Checkpoints as safetensors: weights plus JSON metadata (model config, label map, feature dim, encoder id).

Loading never unpickles anything. Features from another encoder or of another width are refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path
from ..errors import WsiMilError, one_line
from .models import build_model


@dataclass
class CheckpointMeta:
    model: dict  # ModelConfig as a dict: name, hidden_dim, attention_dim, dropout, kwargs
    label_map: dict[str, int]
    feature_dim: int
    encoder_id: str
    fold: int = 0
    best_epoch: int = 0
    config: dict | None = None
    out_dim: int | None = None  # the head's output width; None (older checkpoints): one per class
    task: dict | None = None  # the fold's task: its name and what it was fitted to (e.g. survival intervals)


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights as contiguous CPU tensors (what a checkpoint holds; picklable between processes)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(path: str | Path, model: torch.nn.Module | dict[str, torch.Tensor], meta: CheckpointMeta) -> None:
    """Write ``model`` (a module, or its :func:`state_of`) and ``meta`` to a safetensors file, atomically."""
    state = model if isinstance(model, dict) else state_of(model)
    with atomic_path(path) as tmp:
        try:
            save_file(state, str(tmp), metadata={"wsi_mil": json.dumps(asdict(meta))})
        except Exception as exc:  # SafetensorError on a full disk is no OSError: one line all the same
            raise WsiMilError(f"{Path(path).name}: cannot write the checkpoint ({one_line(exc)})") from None


def read_meta(path: str | Path) -> CheckpointMeta:
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("wsi_mil")
    except Exception as exc:  # SafetensorError, OSError: not a safetensors file at all
        raise WsiMilError(f"{Path(path).name}: not a safetensors checkpoint ({one_line(exc)})") from None
    if raw is None:
        raise WsiMilError(f"{Path(path).name}: not a wsi_mil checkpoint (no metadata)")
    try:
        return CheckpointMeta(**json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise WsiMilError(f"{Path(path).name}: unreadable wsi_mil metadata ({one_line(exc)})") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, CheckpointMeta]:
    path = Path(path)
    if not path.is_file():
        raise WsiMilError(f"checkpoint not found: {path}")
    meta = read_meta(path)
    try:
        width = meta.out_dim or len(meta.label_map)
        model = build_model(meta.model, meta.feature_dim, width)  # name + kwargs from the metadata
        model.load_state_dict(load_file(str(path), device=str(device)))
    except WsiMilError:
        raise
    except Exception as exc:  # metadata that does not describe these weights, or unreadable tensors
        raise WsiMilError(f"{path.name}: its weights do not match its metadata ({one_line(exc)[:200]}); "
                          f"train it again") from None
    return model.to(device).eval(), meta


def check_compatible(meta: CheckpointMeta, feature_dim: int, encoder_id: str, where: str) -> None:
    if feature_dim != meta.feature_dim or encoder_id != meta.encoder_id:
        raise WsiMilError(
            f"{where}: features are {feature_dim}-d from encoder '{encoder_id}', but the model was trained on "
            f"{meta.feature_dim}-d features from '{meta.encoder_id}'; extract with the same encoder"
        )
