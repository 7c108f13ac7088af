"""Predict: one checkpoint, or the mean probability of a run's fold checkpoints, applied to feature files.

``wsi-mil run`` chains tile -> extract -> predict (or train, when there is no model yet and labels are
given) -> heatmap: the path a deployed model takes on new slides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..atomic import write_csv
from ..config import Config
from ..errors import WsiMilError
from ..mil.checkpoint import CheckpointMeta, check_compatible, load_checkpoint
from ..mil.data import feature_info, load_features


def checkpoint_files(model_path: Path) -> list[Path]:
    if model_path.is_file():
        return [model_path]
    files = sorted(model_path.glob("fold_*.safetensors")) if model_path.is_dir() else []
    if not files:
        raise WsiMilError(f"no checkpoint at {model_path} (a .safetensors file, or a run folder with fold_*.safetensors)")
    return files


class Ensemble:
    """The fold models of a run; probabilities are averaged over them."""

    def __init__(self, model_path: Path):
        loaded = [load_checkpoint(p) for p in checkpoint_files(Path(model_path))]
        self.models = [m for m, _ in loaded]
        self.meta: CheckpointMeta = loaded[0][1]
        self.classes = sorted(self.meta.label_map, key=self.meta.label_map.get)

    @torch.no_grad()
    def __call__(self, features: torch.Tensor, precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
        """Mean class probabilities (C,) and mean per-instance attention logits (N,) for one bag."""
        x = features.float()[None]
        mask = torch.ones(1, len(features), dtype=torch.bool)
        probs, atts = [], []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            for model in self.models:
                logits, att = model(x, mask)
                probs.append(torch.softmax(logits.float(), 1)[0])
                atts.append(att[0].float())
        return torch.stack(probs).mean(0).numpy(), torch.stack(atts).mean(0).numpy()


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX), where bf16 inference is faster."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def predict_files(ensemble: Ensemble, files: list[Path]) -> list[dict]:
    rows = []
    for path in files:
        dim, enc = feature_info(path)
        check_compatible(ensemble.meta, dim, enc, path.name)
        probs, _ = ensemble(load_features(path))
        row = {"slide_id": path.stem}
        row.update({f"prob_{c}": f"{p:.6f}" for c, p in zip(ensemble.classes, probs)})
        row["pred"] = ensemble.classes[int(np.argmax(probs))] if len(probs) else ""
        rows.append(row)
    return rows


def predict_command(args, cfg: Config) -> int:
    from .train import run_dir

    model_path = args.model or run_dir(args.out, cfg)
    ensemble = Ensemble(model_path)
    features = Path(args.features) if args.features else Path(args.out) / "features" / ensemble.meta.encoder_id
    files = sorted(features.glob("*.h5"))
    if not files:
        raise WsiMilError(f"no feature files in {features}")
    rows = predict_files(ensemble, files)
    name = Path(model_path).stem if Path(model_path).is_file() else Path(model_path).name
    output = Path(args.output) if args.output else Path(args.out) / "predictions" / f"{name}.csv"
    write_csv(output, rows)
    print(f"predict: {len(rows)} slides with {len(ensemble.models)} model(s) -> {output}")
    return 0


def run_command(args, cfg: Config) -> int:
    """tile -> extract -> predict (or train first when no model exists and labels are given) -> heatmap."""
    from ..cli import run_slide_stage
    from .train import run_dir, train_command

    for stage in ("tile", "extract"):
        rc = run_slide_stage(stage, args, cfg)
        if rc == 2:
            return rc
    model = getattr(args, "model", None) or run_dir(args.out, cfg)
    if not Path(model).exists():
        if cfg.train.labels is None:
            raise WsiMilError(f"no trained model at {model}: pass --model, or train.labels to train one first")
        train_command(args, cfg)
    args.model = model
    predict_command(args, cfg)
    cfg = cfg.model_copy(update={"heatmap": cfg.heatmap.model_copy(update={"run": str(Path(model).resolve())})})
    return run_slide_stage("heatmap", args, cfg)
