"""The study one viewer serves: the slides of an output folder and what the stages recorded for each.

Everything is read through :class:`~wsi_mil.layout.Layout`. A slide id from a URL is only ever looked up in
:attr:`Study.slides`; it is never joined into a path. Files are served only if they resolve inside the
output folder (a symlink out of the study is treated as absent).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import WSI_EXTENSIONS
from ..errors import WsiMilError
from ..formats import read_patch_file
from ..layout import Layout, check_name, is_data_name, slide_files
from ..runner.manifest import read_manifest
from ..slide.dicomweb import slide_exists
from ..slide.discover import discover_slides
from ..userfiles import read_csv_rows

STAGES = ("tile", "extract", "heatmap")
CLASS_COLUMNS = ["label", "prediction", "probability"]
BOOKKEEPING = {"slide_id", "slides", "fold", "note", "n_patches", "model_id", "split"}


@dataclass
class SlideEntry:
    slide_id: str
    path: Path | None = None
    label: str | None = None
    prediction: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    n_patches: int | None = None
    status: dict[str, str] = field(default_factory=dict)  # stage -> done | failed | skipped
    reasons: list[str] = field(default_factory=list)  # "stage: one-line reason" of failed stages
    has_heatmap: bool = False
    values: dict[str, float | str] = field(default_factory=dict)  # the task's columns (survival, regression, ...)
    headline: str | None = None  # the task's prediction in words, as the heatmap's title gives it

    @property
    def probability(self) -> float | None:
        return self.probabilities.get(self.prediction) if self.prediction else None

    def to_json(self) -> dict:
        row = asdict(self)
        row["path"] = None if self.path is None else self.path.name
        row["probability"] = self.probability
        row["viewable"] = self.path is not None
        return row


class Study:
    """The slides of ``out`` (manifest, patches, heatmaps of ``run``, and ``slides`` when given)."""

    def __init__(self, out: str | Path, slides: str | Path | None = None, run: str | None = None,
                 extensions: list[str] | None = None):
        self.layout = Layout(Path(out))
        if not self.layout.root.is_dir():
            raise WsiMilError(f"--out {out}: no such output folder")
        self._root = self.layout.root.resolve()
        runs = self.layout.heatmap_runs()
        if run is not None and run not in runs:  # no heatmaps yet: it must be a model, checked as every model is
            if not self.layout.run_dir(run).is_dir():
                raise WsiMilError(f"--run {run}: no such run in {out} (runs with heatmaps: {', '.join(runs) or 'none'})")
            from ..mil.ensemble import resolve_model  # torch: only when a model, not heatmaps, is named

            resolve_model(self.layout, run)
        self.run = run or ("default" if "default" in runs else (runs[0] if runs else "default"))
        self._source = slides
        self._extensions = extensions or list(WSI_EXTENSIONS)
        self._stamp = self._changes()
        self.task, self.columns = "classification", list(CLASS_COLUMNS)
        self.slides = self._load(self._source, self._extensions)

    def _changes(self) -> tuple:
        """What moves when a stage records a slide: the manifest, the patch and heatmap folders, the
        predictions."""
        paths = (self.layout.manifest, self.layout.patches_dir, self.layout.heatmaps_dir(self.run),
                 self.layout.predictions(self.run))
        return tuple(p.stat().st_mtime_ns if p.exists() else 0 for p in paths)

    def refresh(self) -> bool:
        """Re-read the study if the stages recorded anything since; True when it changed."""
        stamp = self._changes()
        if stamp == self._stamp:
            return False
        self._stamp, self.slides = stamp, self._load(self._source, self._extensions)
        return True

    # -- files ------------------------------------------------------------------------------------
    def inside(self, path: Path) -> Path | None:
        """``path`` if it is a regular file that resolves inside the study (no symlink out), else None."""
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        return real if real.is_file() and real.is_relative_to(self._root) else None

    def heatmap_file(self, slide_id: str, name: str) -> Path | None:
        return self.inside(self.layout.heatmap_file(self.run, slide_id, name))

    def heatmap_summary(self, slide_id: str) -> dict | None:
        path = self.heatmap_file(slide_id, "summary.json")
        if path is None:
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def patches_file(self, slide_id: str) -> Path | None:
        return self.inside(self.layout.patches(slide_id))

    # -- loading ----------------------------------------------------------------------------------
    def _load(self, source, extensions) -> dict[str, SlideEntry]:
        entries: dict[str, SlideEntry] = {}

        def entry(slide_id: str) -> SlideEntry | None:
            try:
                check_name(slide_id)
            except WsiMilError:
                return None
            return entries.setdefault(slide_id, SlideEntry(slide_id))

        if source is not None:
            for ref in discover_slides(source, extensions):
                e = entry(ref.slide_id)
                if e is not None:
                    e.path = ref.path
        for row in read_manifest(self.layout.manifest):
            e = entry(row.get("slide_id", ""))
            if e is None or row.get("stage") not in STAGES + ("predict",):
                continue
            e.status[row["stage"]] = row.get("status", "")
            if row.get("status") == "failed":
                e.reasons.append(f"{row['stage']}: {row.get('reason', '')}")
        for slide_id in slide_files(self.layout.patches_dir):
            entry(slide_id)
        if self.layout.heatmaps_dir(self.run).is_dir():
            for p in sorted(self.layout.heatmaps_dir(self.run).iterdir()):
                if p.is_dir() and is_data_name(p.name):  # not a slide folder still being built
                    entry(p.name)
        labels, label_cols = self._csv_by_slide(self.layout.out_of_fold(self.run))
        new, new_cols = self._csv_by_slide(self.layout.predictions(self.run))
        predicted = {**labels, **new}
        for sid, e in entries.items():
            self._fill(e, labels.get(sid), predicted.get(sid))
        self.task = self._run_task(entries)
        if self.task != "classification":
            seen = [c for e in entries.values() for c in e.values]
            grouped = any(str(e.values.get("patient_id", sid)) != sid for sid, e in entries.items())
            hidden = BOOKKEEPING | (set() if grouped else {"patient_id"})  # the patient only where it groups slides
            self.columns = list(dict.fromkeys(c for c in [*label_cols, *new_cols, *seen] if c not in hidden))
        return dict(sorted(entries.items()))

    def _run_task(self, entries: dict[str, SlideEntry]) -> str:
        """The run's task: its summary.json's, else its heatmaps'; classification for older runs."""
        path = self.inside(self.layout.run_dir(self.run) / "summary.json")
        try:
            task = json.loads(path.read_text(encoding="utf-8")).get("task") if path else None
        except (OSError, ValueError, AttributeError):
            task = None
        if task is None:
            tasks = [(self.heatmap_summary(sid) or {}).get("task") for sid in entries if entries[sid].has_heatmap]
            task = next((t for t in tasks if t), None)
        return str(task or "classification")

    def _csv_by_slide(self, path: Path) -> tuple[dict[str, dict], list[str]]:
        """A predictions CSV's rows by slide (a patient's row under each of its ``slides``), and its header."""
        if self.inside(path) is None:
            return {}, []
        try:
            rows = read_csv_rows(path, path.name)
        except WsiMilError:
            return {}, []
        by_slide = {}
        for r in rows:
            for sid in (str(r.get("slides") or "").split(";") if r.get("slides") else [r.get("slide_id", "")]):
                by_slide[sid] = r
        return by_slide, list(rows[0]) if rows else []

    def _fill(self, e: SlideEntry, labelled: dict | None, predicted: dict | None) -> None:
        patches = self.patches_file(e.slide_id)
        if patches is not None:
            try:
                coords, spec = read_patch_file(patches)
                e.n_patches, recorded = len(coords), spec.slide_path
            except (OSError, KeyError, ValueError, TypeError):
                recorded = None
            if e.path is None and recorded:
                e.path = Path(str(recorded)) if slide_exists(str(recorded)) else None
        if labelled and labelled.get("label"):
            e.label = labelled["label"]
        summary = self.heatmap_summary(e.slide_id)
        if summary is not None:
            e.has_heatmap = summary.get("n_patches", 0) > 0 and self.heatmap_file(e.slide_id, "scores.h5") is not None
            e.prediction = summary.get("prediction")
            e.probabilities = _numbers(summary.get("probabilities"))
        elif predicted:
            e.prediction = predicted.get("pred") or None
            e.probabilities = {k[5:]: v for k, v in _numbers(predicted).items() if k.startswith("prob_")}
        for row in (labelled, predicted):
            e.values.update({k: _cell(v) for k, v in (row or {}).items() if k not in BOOKKEEPING and v not in ("", None)})
        if summary is not None:
            e.values.update(_numbers(summary.get("outputs")))
            e.headline = str(summary["title"]) if summary.get("title") is not None else None
        if e.headline is None and e.values:
            e.headline = "  ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in e.values.items()
                                   if k not in ("label", "patient_id"))


def _number(text) -> bool:
    """A finite number (a NaN or inf cell stays text: JSON has no such numbers)."""
    try:
        return math.isfinite(float(text))
    except (TypeError, ValueError):
        return False


def _numbers(mapping) -> dict[str, float]:
    """The finite numbers of a mapping read from a file (anything else in it, or a non-mapping, is left out:
    a hand-edited summary never turns into a 500)."""
    if not isinstance(mapping, dict):
        return {}
    return {str(k): float(v) for k, v in mapping.items() if not isinstance(v, bool) and _number(v)}


def _cell(text) -> float | str:
    """A CSV cell as a number where it is one (sortable), else its text."""
    return float(text) if _number(text) else str(text)
