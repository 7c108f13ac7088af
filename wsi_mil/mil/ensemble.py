"""A trained model as one predictor: a single checkpoint, or the fold models of a complete run.

A run folder is complete only when its ``summary.json`` exists (train writes it last, listing its fold
files); anything else is refused with one line. ``model_id`` names exactly the weights used, so outputs
made with one model are recognised as stale once the model changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import file_sha256, write_json
from ..errors import WsiMilError
from ..layout import Layout
from .checkpoint import CheckpointMeta, load_checkpoint

RUN_MARKER = "summary.json"


def write_run_summary(run_dir: str | Path, summary: dict) -> Path:
    """Write a run's ``summary.json``, the marker that makes it complete; it must list its ``fold_files``.
    Strict JSON: a fold metric that a one-class test fold leaves undefined is null, not NaN."""
    if not summary.get("fold_files"):
        raise ValueError("a run summary must list its fold_files")
    path = Path(run_dir) / RUN_MARKER
    write_json(path, summary)
    return path


def _sha(path: Path) -> str:
    return file_sha256(path)[:16]


def is_complete_run(path: str | Path) -> bool:
    try:
        model_files(path)
        return True
    except WsiMilError:
        return False


def model_files(model_path: str | Path) -> list[Path]:
    """The checkpoint files a model path stands for (one file, or a complete run's folds)."""
    path = Path(model_path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise WsiMilError(f"model {path}: not a .safetensors checkpoint (give a run folder or a fold_*.safetensors)")
        return [path]
    if not path.is_dir():
        raise WsiMilError(f"no trained model at {path}: train one, or pass a run folder or a .safetensors checkpoint")
    marker = path / RUN_MARKER
    if not marker.is_file():
        raise WsiMilError(f"{path} is not a complete training run (no {RUN_MARKER}): a killed or unfinished "
                          f"'wsi-mil train'; train it again")
    try:
        names = json.loads(marker.read_text())["fold_files"]
    except (ValueError, KeyError, TypeError):
        raise WsiMilError(f"{marker}: not a wsi_mil run summary (no fold_files); train it again") from None
    files = [path / str(n) for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if not files or missing:
        raise WsiMilError(f"{path}: run is incomplete, missing {', '.join(missing) or 'every fold'}; train it again")
    _check_hashes(marker, files)
    return files


def _check_hashes(marker: Path, files: list[Path]) -> None:
    """Each fold file must be the one train wrote: its sha256 as ``summary.json`` lists it."""
    try:
        listed = json.loads(marker.read_text()).get("fold_sha256")
    except (ValueError, AttributeError):
        listed = None
    if not listed:
        return  # runs written before fold hashes were recorded
    if len(listed) != len(files):
        raise WsiMilError(f"{marker}: lists {len(files)} fold files but {len(listed)} hashes; train it again")
    for f, want in zip(files, listed):
        if file_sha256(f) != want:
            raise WsiMilError(f"{f}: not the file this run trained (its sha256 differs from {marker.name}'s "
                              f"fold_sha256); a fold file was replaced or copied over: train the run again")


@dataclass(frozen=True)
class ModelRef:
    """A trained model, resolved and checked: its path, its name (for ``heatmaps/<name>/`` and
    ``predictions/<name>.csv``), its checkpoint files and its content id."""

    path: Path
    name: str
    files: tuple[Path, ...]
    model_id: str

    @classmethod
    def from_path(cls, path: str | Path) -> ModelRef:
        path = Path(path)
        files = tuple(model_files(path))  # complete, and every fold the one trained
        name = path.name.removesuffix(".safetensors") if path.is_file() else path.resolve().name
        return cls(path, name, files, _sha(path / RUN_MARKER) if path.is_dir() else _sha(files[0]))


def resolve_model(layout: Layout, ref: str | Path) -> ModelRef:
    """The one place a model reference becomes a model: ``--model``, ``heatmap.run``, ``train.run_name``.

    A plain name is a run under ``models/``; a ``Path``, a string with a ``/`` or a ``.safetensors`` file
    name is a path to a run folder or a checkpoint. The run must be complete and its fold files the ones
    it trained (their hashes); anything else is one line.
    """
    return ModelRef.from_path(model_path(layout, ref))


def model_path(layout: Layout, ref: str | Path) -> Path:
    """Where a model reference points (see :func:`resolve_model`), without checking anything there."""
    text = str(ref)
    if isinstance(ref, Path) or "/" in text or text.endswith(".safetensors"):
        return Path(ref)
    return layout.run_dir(text)


def model_id(model_path: str | Path) -> str:
    """A short content hash of the model: the run's summary (which names its folds and their hashes) or the
    checkpoint itself. The fold files are checked against those hashes first."""
    return ModelRef.from_path(model_path).model_id


def _run_threshold(path: Path) -> dict:
    """A complete run's ``threshold`` from its summary.json ({} for a single checkpoint or older runs)."""
    marker = Path(path) / RUN_MARKER
    if not marker.is_file():
        return {}
    try:
        return dict(json.loads(marker.read_text()).get("threshold") or {})
    except (ValueError, TypeError, AttributeError):
        return {}


class Ensemble:
    """The fold models of a run (or one checkpoint); probabilities and instance scores are averaged over
    them. ``per_class``: the head scores instances per class ([C, N]) rather than once ([N])."""

    def __init__(self, model: str | Path | ModelRef, device: str | torch.device = "cpu"):
        self.ref = model if isinstance(model, ModelRef) else ModelRef.from_path(model)
        self.path = self.ref.path
        self.device = torch.device(device)
        self.model_id = self.ref.model_id
        loaded = [load_checkpoint(p, self.device) for p in self.ref.files]
        self.models = [m for m, _ in loaded]
        self.meta: CheckpointMeta = loaded[0][1]
        from .tasks import task_from_checkpoint

        threshold = _run_threshold(self.path)  # the run's operating threshold, picked on its out-of-fold data
        self.tasks = [task_from_checkpoint(meta).with_threshold(threshold) for _, meta in loaded]
        self.task = self.tasks[0]
        self.classes = sorted(self.meta.label_map, key=self.meta.label_map.get)
        self.per_class = bool(getattr(self.models[0], "per_class", False))

    @torch.no_grad()
    def __call__(self, features: torch.Tensor, precision: str = "fp32",
                 cells: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The mean of the folds' outputs (class probabilities (C,); the risk, value or per-target
        probabilities for other tasks) and mean instance scores ((N,) or (C, N)) for one bag; ``cells``
        (N, 2) are its grid cells, for heads that use positions."""
        x = features.float()[None].to(self.device)
        mask = torch.ones(1, len(features), dtype=torch.bool, device=self.device)
        coords = None if cells is None else torch.as_tensor(cells)[None].to(self.device)
        probs, scores = [], []
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=precision == "bf16" or (self.device.type == "cuda" and precision != "fp32")):
            for model, task in zip(self.models, self.tasks):
                out = model(x, mask, coords)
                probs.append(task.ensemble_output(task.outputs(out.logits.float()).cpu().numpy()))
                scores.append(out.instance_scores[0].float())
        p, sc = np.mean(probs, axis=0), torch.stack(scores).mean(0).cpu().numpy()
        if not (np.isfinite(p).all() and np.isfinite(sc).all()):
            raise WsiMilError(f"model {self.path.name} gave NaN or inf for this bag; no prediction")
        return p, sc
