"""Predict: one checkpoint, or the mean output of a complete run's fold checkpoints, applied to feature
files -> ``predictions/<run>.csv``; one row per slide, or per patient for runs trained on patient bags.

One unreadable or incompatible features file is recorded (manifest.csv, stage ``predict``) and the other
slides are still predicted. A slide with no patches gets an empty prediction and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import write_csv
from ..config import Config
from ..device import pick_device
from ..errors import WsiMilError, one_line
from ..layout import Layout, slide_files
from ..mil.checkpoint import check_compatible
from ..mil.data import bag_cells, feature_info, load_features, side_by_side
from ..mil.ensemble import Ensemble, resolve_model
from ..mil.patients import group_slides, patient_map
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
        bags = "patients" if self.rows and "patient_id" in self.rows[0] else "slides"
        line = (f"predict: {len(self.rows)} {bags} with {self.n_models} model(s), {len(self.failed)} failed "
                f"-> {self.output}")
        if self.failed:
            line += f"; failed: {', '.join(r.slide_id for r in self.failed)} (reasons in manifest.csv)"
        return line


def predict_file(ensemble: Ensemble, path: Path) -> dict:
    """One slide's row: the task's prediction (class probabilities and class; risk; value; per-target
    probabilities), empty with a note for 0 patches."""
    return predict_bag(ensemble, [path], {"slide_id": path.stem})


def predict_bag(ensemble: Ensemble, paths: list[Path], ident: dict, note: str = "") -> dict:
    """One bag's row: a slide, or a patient's slides' features read one after the other as one bag."""
    parts = []
    for path in paths:
        dim, enc = feature_info(path)
        check_compatible(ensemble.meta, dim, enc, path.name)
        parts.append(load_features(path))
    feats = torch.cat(parts)
    cells = side_by_side([bag_cells(p) for p in paths])
    row = {**ident, "n_patches": len(feats), "model_id": ensemble.model_id}
    if len(feats) == 0:
        row.update({**ensemble.task.ensemble_row(None),
                    "note": "; ".join(filter(None, ["0 patches (no tissue): no prediction", note]))})
        return row
    output, _ = ensemble(feats, cells=cells)
    row.update({**ensemble.task.ensemble_row(output), "note": note})
    return row


def _bags(files: dict[str, Path], patients: dict[str, str] | None) -> list[tuple[dict, list[Path], str]]:
    """(row ids, feature files, note) per bag: one per slide, or per patient for a patient-level run."""
    if patients is None:
        return [({"slide_id": sid}, [path], "") for sid, path in files.items()]
    out = []
    for pid, slides in group_slides(list(files), patients).items():
        note = "" if slides[0] in patients else "not in the slide -> patient CSV: predicted as a patient of its own"
        out.append(({"patient_id": pid, "slides": ";".join(slides)}, [files[s] for s in slides], note))
    return out


def predict(layout: Layout, cfg: Config, model: Path | None = None, features: Path | None = None,
            output: Path | None = None) -> PredictResult:
    """Every bag's row into ``predictions/<run>.csv``: per slide, or per patient (``patient_id``, its
    ``slides``) when the run was trained with ``train.bag_level=patient``."""
    ref = resolve_model(layout, Path(model) if model else cfg.train.run_name)
    ensemble = Ensemble(ref, pick_device(cfg.train.device))
    features = Path(features) if features else layout.features_dir(ensemble.meta.encoder_id)
    files = slide_files(features)
    if not files:
        raise WsiMilError(f"no feature files in {features}")
    result = PredictResult(Path(output) if output else layout.predictions(ref.name), len(ensemble.models))
    patients = patient_map(ensemble.meta, cfg.train.labels)
    for ident, paths, note in _bags(files, patients):
        try:
            result.rows.append(predict_bag(ensemble, paths, ident, note))
        except Exception as exc:  # one bad file never stops the others
            for path in paths:
                result.failed.append(Record(path.stem, "predict", "failed", 0.0, one_line(exc)))
    columns = ensemble.task.ensemble_columns()
    ids = ["patient_id", "slides"] if patients is not None else ["slide_id"]
    write_csv(result.output, result.rows, [*ids, *columns, "n_patches", "model_id", "note"])
    done = [Record(sid, "predict", "done", 0.0, r["note"] or str(r.get("pred", r[columns[0]])))
            for r in result.rows for sid in (r["slides"].split(";") if "slides" in r else [r["slide_id"]])]
    update_manifest(layout.manifest, done + result.failed)
    return result
