"""torchmil's ``WSIDataset`` layout: ``features/<name>.npy`` (N, D), ``labels/<name>.npy`` (a 0-d int class;
by task: a 0-d float for regression, a (T,) int 0/1 vector for multi-label, (time, event) float for
survival),
``coords/<name>.npy`` (N, 2). torchmil turns coords into grid cells with
``((coords / patch_size) - min).astype(int)``, which merges cells when the level-0 step is fractional
(256.5 px on an 0.2499 µm/px scan). So the exported coords are our exact grid cells times
``patch_size``: pass the ``patch_size`` written in ``torchmil.json`` and every cell stays distinct."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..atomic import write_text
from ..formats import read_bag, read_grid_index
from . import Study, register_format, save_npy

PATCH_SIZE = 512  # torchmil's default; any positive integer works, since coords are cells * PATCH_SIZE


@register_format("torchmil")
def export(study: Study, to: Path) -> str:
    ids = study.slide_ids()
    label_map = study.label_map()
    for sid in ids:
        feats = read_bag(study.layout.features(study.encoder_id, sid)).astype(np.float32)
        cells = read_grid_index(study.layout.patches(sid))
        save_npy(to / "features" / f"{sid}.npy", feats)
        save_npy(to / "coords" / f"{sid}.npy", cells * PATCH_SIZE)
        if sid in study.labels:
            save_npy(to / "labels" / f"{sid}.npy", _label(study, sid, label_map))
    write_text(to / "torchmil.json", json.dumps({
        "patch_size": PATCH_SIZE, "task": study.task, "label_map": label_map, "encoder_id": study.encoder_id,
        "coords": "grid cell (col, row) * patch_size; pass patch_size to WSIDataset",
    }, indent=1))
    n_lab = sum(s in study.labels for s in ids)
    return f"torchmil: {len(ids)} slides ({n_lab} labelled) in features, coords, labels; patch_size={PATCH_SIZE}"


def _label(study: Study, slide_id: str, label_map: dict[str, int]) -> np.ndarray:
    row = study.labels[slide_id]
    if study.task == "survival":
        return np.array([row["time"], row["event"]], np.float32)
    if study.task == "regression":
        return np.array(row["value"], np.float32)
    if study.task == "multilabel":
        return np.array(row["values"], np.int64)
    return np.array(label_map[row["label"]], np.int64)
