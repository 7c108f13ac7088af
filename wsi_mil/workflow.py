"""``wsi-mil run``: tile -> extract -> predict (training first when there is no complete model yet and
labels are given) -> heatmap. The path a deployed model takes on new slides.

Every stage's outcome is kept: the run fails (exit 1 from the CLI) when any slide failed in any stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .errors import WsiMilError
from .layout import Layout
from .mil.data import read_labels
from .mil.ensemble import is_complete_run
from .slide import SlideRef
from .stages import extract, heatmap, tile
from .stages.base import run_stage
from .stages.predict import predict
from .stages.train import train
from .userfiles import read_json


@dataclass
class StageOutcome:
    stage: str
    ok: bool
    line: str


def labels_note(run: Path, cfg: Config) -> str | None:
    """A line when ``train.labels`` is given but a complete run already exists and is used instead: always
    that it was not retrained, and which classes differ when they do."""
    summary = read_json(run / "summary.json", "run summary")
    differ = ""
    if summary.get("task", "classification") == "classification":  # other tasks have no classes to compare
        classes = set(summary.get("classes") or [])
        labels = {r["label"] for r in read_labels(cfg.train.labels, fold_case=cfg.train.fold_label_case)}
        differ = "" if labels == classes else (f"; its classes {sorted(classes)} differ from the labels' "
                                               f"{sorted(labels)}")
    if summary.get("bag_level") == "patient":
        differ += "; its slide -> patient map groups the slides into the model's patient bags"
    return (f"run: train.labels is not trained on: the complete model {run} is used as it is{differ} "
            f"(to retrain, run 'wsi-mil train' or choose another train.run_name)")


def run_pipeline(slides: list[SlideRef], layout: Layout, cfg: Config, model: Path | None = None,
                 progress: bool = True) -> list[StageOutcome]:
    outcomes = []
    for stage in (tile.STAGE, extract.STAGE):
        result = run_stage(stage, slides, cfg, layout, progress)
        outcomes.append(StageOutcome(stage.name, result.ok, result.summary()))
    if model is None:
        model = layout.run_dir(cfg.train.run_name)
        if not is_complete_run(model):
            if cfg.train.labels is None:
                raise WsiMilError(f"no complete trained model at {model}: pass --model, or train.labels to train one")
            summary, model = train(layout, cfg, progress)
            outcomes.append(StageOutcome("train", True, f"train: {summary['n_slides']} slides -> {model}"))
        elif cfg.train.labels is not None:
            note = labels_note(model, cfg)
            if note:
                print(note)
    result = predict(layout, cfg, model=model)
    outcomes.append(StageOutcome("predict", result.ok, result.summary()))
    result = run_stage(heatmap.heatmap_stage(Path(model).resolve()), slides, cfg, layout, progress)
    outcomes.append(StageOutcome("heatmap", result.ok, result.summary()))
    return outcomes
