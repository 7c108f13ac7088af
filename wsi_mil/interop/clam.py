"""CLAM's layout. ``main.py`` trains from ``<data_dir>/pt_files/<slide_id>.pt`` (``torch.load`` of an
(N, D) tensor); its h5 branch reads ``h5_files/<slide_id>.h5`` (``features``, ``coords``); patching
outputs live in ``patches/<slide_id>.h5``; the dataset CSV has ``case_id, slide_id, label``, or for
survival the columns CLAM's survival forks (PORPOISE, MCAT) read: ``survival_months`` and
``censorship`` = 1 - event; multi-label writes its 0/1 columns."""

from __future__ import annotations

from pathlib import Path

import torch

from ..atomic import atomic_path, write_csv
from ..formats import read_bag
from . import Study, link, register_format


@register_format("clam")
def export(study: Study, to: Path) -> str:
    ids = study.slide_ids()
    for sid in ids:
        feats_h5 = study.layout.features(study.encoder_id, sid)
        link(feats_h5, to / "h5_files" / f"{sid}.h5")
        link(study.layout.patches(sid), to / "patches" / f"{sid}.h5")
        bag = torch.from_numpy(read_bag(feats_h5)).float()
        with atomic_path(to / "pt_files" / f"{sid}.pt") as tmp:
            torch.save(bag, tmp)
    rows = [{"case_id": study.labels[s].get("patient_id") or s, "slide_id": s, **_target(study, s)}
            for s in ids if s in study.labels]
    if rows:
        write_csv(to / "dataset.csv", rows, list(rows[0]))
    return f"clam: {len(ids)} slides in pt_files, h5_files, patches" + (
        f", dataset.csv with {len(rows)} labelled slides" if rows else " (no train.labels: no dataset.csv)")


def _target(study: Study, slide_id: str) -> dict:
    row = study.labels[slide_id]
    if study.task == "survival":
        return {"survival_months": f"{row['time']:g}", "censorship": 1 - int(row["event"])}
    if study.task == "multilabel":
        return {c: row[c] for c in study.columns}
    return {"label": row["label"]}
