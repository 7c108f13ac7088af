"""``wsi-mil export --format NAME``: a study's outputs in another tool's folder layout.

Each format is one module with one function ``export(study, to) -> note`` registered by name. Files are
linked where the tool reads ours unchanged (patch and feature HDF5) and converted where it needs another
form (CLAM's ``.pt`` bags, torchmil's ``.npy`` files).

An export is built whole in a fresh temp folder beside ``--to`` and swapped in at the end, like a train
run: a re-export leaves nothing of the previous one (no stale label or ``dataset.csv``), a killed one
leaves the previous export and a temp folder the next run removes. ``--to`` is refused when it resolves to
the study's output folder, into one of its stage folders, or to a folder that holds the study; and a
non-empty folder that no export made (no ``.wsi_mil-export.json``) is never replaced.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, clean_stale_temps_of, write_text
from ..errors import WsiMilError
from ..formats import PatchSpec, read_patch_spec
from ..layout import Layout, check_name, encoder_id, slide_files

MARKER = ".wsi_mil-export.json"


@dataclass
class Study:
    """What an export reads: the layout, the encoder whose features go out, and optional labels."""

    layout: Layout
    encoder_id: str
    labels: dict[str, dict] = field(default_factory=dict)  # slide_id -> row with label, patient_id
    task: str = "classification"  # survival rows also hold time and event; regression value; multilabel values
    columns: tuple[str, ...] = ("label",)  # the labels CSV's columns the task reads

    def slide_ids(self) -> list[str]:
        folder = self.layout.features_dir(self.encoder_id)
        ids = sorted(slide_files(folder))
        if not ids:
            raise WsiMilError(f"no feature files in {folder}; run 'wsi-mil extract' (or set encoder.name)")
        return ids

    def label_map(self) -> dict[str, int]:
        from ..mil.data import make_label_map

        if self.task != "classification" or not self.labels:
            return {}
        return make_label_map([r["label"] for r in self.labels.values()])

    def target(self, slide_id: str) -> PatchSpec:
        """Our own target description of a slide's patches (from its patch file)."""
        return read_patch_spec(self.layout.patches(slide_id))


def load_study(out: Path, encoder_name: str, labels_csv: Path | None, fold_case: bool = False,
               tcfg=None) -> Study:
    """The study's features and, with ``labels_csv``, its labels read as ``train.task`` reads them
    (``tcfg``: the train config; survival's time and event, a regression value, multi-label 0/1s)."""
    from ..mil.data import read_labels
    from ..mil.tasks import task_class

    task = tcfg.task if tcfg is not None else "classification"
    labels = {}
    kind = task_class(task)
    columns = kind.label_columns(tcfg) if tcfg is not None else ("label",)
    if labels_csv is not None:
        rows = read_labels(labels_csv, fold_case=fold_case, columns=columns)
        parse = kind.parse_labels(tcfg) if tcfg is not None else None
        fields = parse(rows, Path(labels_csv).name) if parse else [{}] * len(rows)
        labels = {row["slide_id"]: {**row, **extra} for row, extra in zip(rows, fields)}
    return Study(Layout(out), encoder_id(encoder_name), labels, task, columns)


def link(src: Path, dst: Path) -> None:
    """``dst`` points at ``src`` (a symlink to its absolute path), replaced atomically."""
    if not src.is_file():
        raise WsiMilError(f"missing {src}")
    if dst.resolve() == src.resolve():
        raise WsiMilError(f"export: {dst} is {src} itself; refusing to link a file over itself")
    with atomic_path(dst) as tmp:
        os.symlink(src.resolve(), tmp)


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


Exporter = Callable[[Study, Path], str]
FORMATS: dict[str, Exporter] = {}


def register_format(name: str):
    def deco(fn: Exporter) -> Exporter:
        FORMATS[check_name(name, "format")] = fn
        return fn
    return deco


def check_target(study: Study, to: Path) -> Path:
    """``to`` if an export may replace it whole; a one-line error for anything of the study's or the user's."""
    to = Path(to)
    root = study.layout.root
    if study.layout.owns(to):
        raise WsiMilError(f"export --to {to}: it is, holds, or lies inside the study's own output folders "
                          f"({root}); an export never writes there: give a folder of its own, e.g. {root}/export")
    if to.exists() and not to.is_dir():
        raise WsiMilError(f"export --to {to}: exists and is not a folder")
    if to.is_dir() and not (to / MARKER).is_file() and any(to.iterdir()):
        raise WsiMilError(f"export --to {to}: a non-empty folder that no wsi-mil export made; an export replaces "
                          f"its whole folder, so give a new or empty one")
    return to


def export_study(fmt: str, study: Study, to: Path) -> str:
    from . import clam, torchmil, trident  # noqa: F401  (registration)

    if fmt not in FORMATS:
        raise WsiMilError(f"unknown export format '{fmt}' (choose from {', '.join(sorted(FORMATS))})")
    to = check_target(study, to)
    study.slide_ids()  # nothing to export is an error before anything is built
    clean_stale_temps_of(to)  # what a killed export left
    with atomic_path(to) as tmp:
        tmp.mkdir()
        note = FORMATS[fmt](study, tmp)
        write_text(tmp / MARKER, json.dumps({"format": fmt, "study": str(study.layout.root.resolve()),
                                             "encoder_id": study.encoder_id}, indent=1))
    return f"{note} -> {to}"
