"""``heatmaps/<run>/<slide_id>/scores.h5``, written by heatmap and read by the viewer.

Datasets: ``coords`` (N, 2) with the patch file's :class:`PatchSpec`; ``attention_logits``, ``attention``
(softmax) and ``attention_percentile`` (N,) of the mapped class; for per-class heads also
``class_attention_logits`` / ``class_attention_percentile`` (C, N); with ``heatmap.refine`` the denser
grid's ``refined_coords`` (M, 2) and ``refined_attention_percentile`` (M,). Root attributes: ``slide_id``,
``run``, ``model_id``, ``classes`` (JSON list), ``mapped_class``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..h5io import attrs_of, write_h5
from .patches import PatchSpec


@dataclass(frozen=True)
class Scores:
    """One slide's patch scores: the mapped class's, every class's (per-class heads), the refined grid's."""

    coords: np.ndarray
    spec: PatchSpec
    logits: np.ndarray  # (N,) the mapped class's attention logits
    attention: np.ndarray  # (N,) their softmax
    percentile: np.ndarray  # (N,)
    classes: list[str]
    mapped_class: str
    slide_id: str = ""
    run: str = ""
    model_id: str = ""
    class_logits: np.ndarray | None = None  # (C, N)
    class_percentile: np.ndarray | None = None  # (C, N)
    refined_coords: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    refined_percentile: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def maps(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Map name -> (percentile, logits): one per class for per-class heads, else ``attention``."""
        if self.class_percentile is not None:
            return {c: (self.class_percentile[k], self.class_logits[k]) for k, c in enumerate(self.classes)}
        return {"attention": (self.percentile, self.logits)}

    def points(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(coords, percentile) painted for map ``name``: the refined patches join the mapped class's map."""
        pct = self.maps()[name][0]
        if len(self.refined_coords) and name in ("attention", self.mapped_class):
            return np.concatenate([self.coords, self.refined_coords]), np.concatenate([pct, self.refined_percentile])
        return self.coords, pct


def write_scores(path: str | Path, s: Scores) -> None:
    data = {"coords": s.coords, "attention_logits": s.logits.astype(np.float32),
            "attention": s.attention.astype(np.float32),
            "attention_percentile": s.percentile.astype(np.float32)}
    if s.class_logits is not None:
        data.update({"class_attention_logits": s.class_logits.astype(np.float32),
                     "class_attention_percentile": s.class_percentile.astype(np.float32)})
    if len(s.refined_coords):
        data.update({"refined_coords": s.refined_coords.astype(np.int64),
                     "refined_attention_percentile": s.refined_percentile.astype(np.float32)})
    root = {"slide_id": s.slide_id, "run": s.run, "model_id": s.model_id, "classes": json.dumps(s.classes),
            "mapped_class": s.mapped_class}
    write_h5(path, data, {"coords": s.spec.to_attrs(), "/": root})


def read_scores(path: str | Path) -> Scores:
    with h5py.File(path, "r") as fh:
        root = attrs_of(fh)
        per_class = "class_attention_percentile" in fh
        refined = "refined_coords" in fh
        return Scores(
            coords=fh["coords"][:].astype(np.int64).reshape(-1, 2), spec=PatchSpec.from_attrs(attrs_of(fh["coords"])),
            logits=fh["attention_logits"][:].astype(np.float32), attention=fh["attention"][:].astype(np.float32),
            percentile=fh["attention_percentile"][:].astype(np.float32),
            classes=list(json.loads(root.get("classes", "[]"))), mapped_class=str(root.get("mapped_class", "")),
            slide_id=str(root.get("slide_id", "")), run=str(root.get("run", "")),
            model_id=str(root.get("model_id", "")),
            class_logits=fh["class_attention_logits"][:].astype(np.float32) if per_class else None,
            class_percentile=fh["class_attention_percentile"][:].astype(np.float32) if per_class else None,
            refined_coords=fh["refined_coords"][:].astype(np.int64).reshape(-1, 2) if refined
            else np.zeros((0, 2), np.int64),
            refined_percentile=fh["refined_attention_percentile"][:].astype(np.float32) if refined
            else np.zeros(0, np.float32),
        )
