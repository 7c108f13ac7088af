"""Predict: one checkpoint, or the mean probability of a complete run's fold checkpoints, applied to
feature files -> ``predictions/<run>.csv``.

One unreadable or incompatible features file is recorded (manifest.csv, stage ``predict``) and the other
slides are still predicted. A slide with no patches gets an empty prediction and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_csv
from ..config import Config
from ..device import pick_device
from ..errors import WsiMilError, one_line
from ..layout import Layout, slide_files
from ..mil.checkpoint import check_compatible
from ..mil.data import feature_info, load_features
from ..mil.ensemble import Ensemble, resolve_model
from ..runner import Record, update_manifest


@dataclass
class PredictResult:
    output: Path
    n_models: int
    rows: list[dict] = field(default_factory=list)
    failed: list[Record] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        line = (f"predict: {len(self.rows)} slides with {self.n_models} model(s), {len(self.failed)} failed "
                f"-> {self.output}")
        if self.failed:
            line += f"; failed: {', '.join(r.slide_id for r in self.failed)} (reasons in manifest.csv)"
        return line


def predict_file(ensemble: Ensemble, path: Path) -> dict:
    """One slide's row: the task's prediction (class probabilities and class; risk; value; per-target
    probabilities), empty with a note for 0 patches."""
    dim, enc = feature_info(path)
    check_compatible(ensemble.meta, dim, enc, path.name)
    feats = load_features(path)
    row = {"slide_id": path.stem, "n_patches": len(feats), "model_id": ensemble.model_id}
    if len(feats) == 0:
        row.update({**ensemble.task.ensemble_row(None), "note": "0 patches (no tissue): no prediction"})
        return row
    output, _ = ensemble(feats)
    row.update({**ensemble.task.ensemble_row(output), "note": ""})
    return row


def predict(layout: Layout, cfg: Config, model: Path | None = None, features: Path | None = None,
            output: Path | None = None) -> PredictResult:
    ref = resolve_model(layout, Path(model) if model else cfg.train.run_name)
    ensemble = Ensemble(ref, pick_device(cfg.train.device))
    features = Path(features) if features else layout.features_dir(ensemble.meta.encoder_id)
    files = list(slide_files(features).values())
    if not files:
        raise WsiMilError(f"no feature files in {features}")
    result = PredictResult(Path(output) if output else layout.predictions(ref.name), len(ensemble.models))
    for path in files:
        try:
            result.rows.append(predict_file(ensemble, path))
        except Exception as exc:  # one bad file never stops the others
            result.failed.append(Record(path.stem, "predict", "failed", 0.0, one_line(exc)))
    columns = ensemble.task.ensemble_columns()
    fields = ["slide_id", *columns, "n_patches", "model_id", "note"]
    write_csv(result.output, result.rows, fields)
    done = [Record(r["slide_id"], "predict", "done", 0.0, r["note"] or str(r.get("pred", r[columns[0]])))
            for r in result.rows]
    update_manifest(layout.manifest, done + result.failed)
    return result
