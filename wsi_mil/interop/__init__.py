"""``wsi-mil export --format NAME``: a study's outputs in another tool's folder layout.

Each format is one module with one function ``export(study, to) -> note`` registered by name. Files are
linked where the tool reads ours unchanged (patch and feature HDF5) and converted where it needs another
form (CLAM's ``.pt`` bags, torchmil's ``.npy`` files). Every written file is atomic; rerunning replaces.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import WsiMilError
from ..h5io import read_coords
from ..layout import Layout, check_name, encoder_id
from ..userfiles import read_csv_rows


@dataclass
class Study:
    """What an export reads: the layout, the encoder whose features go out, and optional labels."""

    layout: Layout
    encoder_id: str
    labels: dict[str, dict] = field(default_factory=dict)  # slide_id -> row with label, patient_id

    def slide_ids(self) -> list[str]:
        folder = self.layout.features_dir(self.encoder_id)
        ids = sorted(p.stem for p in folder.glob("*.h5"))
        if not ids:
            raise WsiMilError(f"no feature files in {folder}; run 'wsi-mil extract' (or set encoder.name)")
        return ids

    def label_map(self) -> dict[str, int]:
        from ..mil.data import make_label_map

        return make_label_map([r["label"] for r in self.labels.values()]) if self.labels else {}

    def target(self, slide_id: str) -> dict:
        """Our own target description of a slide's patches (from its patch file)."""
        _, attrs = read_coords(self.layout.patches(slide_id))
        return attrs


def load_study(out: Path, encoder_name: str, labels_csv: Path | None) -> Study:
    labels = {}
    if labels_csv is not None:
        for row in read_csv_rows(labels_csv, "train.labels"):
            if "slide_id" not in row or "label" not in row:
                raise WsiMilError(f"{Path(labels_csv).name}: labels CSV needs columns slide_id,label")
            labels[row["slide_id"]] = row
    return Study(Layout(out), encoder_id(encoder_name), labels)


def link(src: Path, dst: Path) -> None:
    """``dst`` points at ``src`` (a symlink to its absolute path), replaced atomically."""
    if not src.is_file():
        raise WsiMilError(f"missing {src}")
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


def export_study(fmt: str, study: Study, to: Path) -> str:
    from . import clam, torchmil, trident  # noqa: F401  (registration)

    if fmt not in FORMATS:
        raise WsiMilError(f"unknown export format '{fmt}' (choose from {', '.join(sorted(FORMATS))})")
    Path(to).mkdir(parents=True, exist_ok=True)
    return FORMATS[fmt](study, Path(to))
