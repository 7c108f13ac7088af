"""The one place that knows where every output lives under an output folder (``--out``).

::

    OUT/manifest.csv                              one row per (slide, stage)
    OUT/patches/<slide_id>.h5                     tile
    OUT/masks/<slide_id>.{mask.png,qc.png,grid.png,tissue.geojson}
    OUT/features/<encoder_id>/<slide_id>.h5       extract
    OUT/models/<run>/                             train (complete only once summary.json exists)
    OUT/predictions/<run>.csv                     predict
    OUT/heatmaps/<run>/<slide_id>/                heatmap (summary.json marks a slide done)
    OUT/.locks/<stage>/<slide_id>.lock            runner locks

The viewer (``wsi-mil view``) only reads these; it writes nothing under OUT.

Stages, the viewer and the tests ask this object for paths; nobody joins path pieces by hand. Slide ids
and run names are checked to be plain file names before they are ever joined into a path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import WsiMilError

MASK_KINDS = ("mask.png", "qc.png", "grid.png", "tissue.geojson")
HEATMAP_FILES = ("summary.json", "scores.h5", "overlay.png", "heatmap.tiff", "patches.geojson")


def check_name(name: str, what: str = "slide_id") -> str:
    """``name`` if it is a plain file name (no separators, not ``.``/``..``, no control characters)."""
    if (not name or name in {".", ".."} or "/" in name or "\\" in name or "\x00" in name
            or any(ord(c) < 32 for c in name) or name != name.strip()):
        raise WsiMilError(f"{what} {name!r} is not a plain file name")
    return name


def is_data_name(name: str) -> bool:
    """False for names no reader takes as a slide's file: hidden files and writers' temp files."""
    return bool(name) and not name.startswith(".") and ".wsi_mil-tmp-" not in name


def slide_files(folder: Path, suffix: str = ".h5") -> dict[str, Path]:
    """``slide_id -> file`` for the ``*<suffix>`` files of an output folder, hidden and temp names skipped.

    Every reader of a study folder (predict, train, export, the viewer) lists slides through this, so a
    ``.hidden.h5`` or a dead writer's temp file is never taken as a slide.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {p.name[: -len(suffix)]: p for p in sorted(folder.iterdir())
            if p.name.endswith(suffix) and is_data_name(p.name) and len(p.name) > len(suffix) and p.is_file()}


def encoder_id(name: str) -> str:
    """A folder-safe id for an encoder name: ``hf-hub:org/model`` -> ``hf-hub_org_model``."""
    return check_name(name.replace(":", "_").replace("/", "_").replace("\\", "_"), "encoder id")


@dataclass(frozen=True)
class Layout:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    STAGE_FOLDERS = ("patches", "masks", "features", "models", "predictions", "heatmaps", ".locks")

    def owns(self, path: str | Path) -> bool:
        """True when ``path`` (resolved, symlinks followed) is the output folder itself, one of its stage
        folders or anything inside them, or a folder that holds the output folder: places no command may
        write into or replace on behalf of another tool."""
        root, target = self.root.resolve(), Path(path).resolve()
        if target == root or root.is_relative_to(target):
            return True
        if not target.is_relative_to(root):
            return False
        first = target.relative_to(root).parts[0]
        return first in self.STAGE_FOLDERS or first == self.manifest.name

    # -- batch bookkeeping ------------------------------------------------------------------------
    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    def lock(self, stage: str, slide_id: str) -> Path:
        return self.root / ".locks" / stage / f"{check_name(slide_id)}.lock"

    # -- wsi-mil serve ----------------------------------------------------------------------------
    @property
    def service_queue(self) -> Path:
        return self.root / "service" / "jobs.sqlite"

    @property
    def uploads_dir(self) -> Path:
        """Slides uploaded to ``wsi-mil serve``, one folder per upload; removed when its job ends."""
        return self.root / "service" / "uploads"

    # -- tile -------------------------------------------------------------------------------------
    @property
    def patches_dir(self) -> Path:
        return self.root / "patches"

    def patches(self, slide_id: str) -> Path:
        return self.patches_dir / f"{check_name(slide_id)}.h5"

    @property
    def masks_dir(self) -> Path:
        return self.root / "masks"

    def mask(self, slide_id: str, kind: str = "mask.png") -> Path:
        if kind not in MASK_KINDS:
            raise ValueError(f"unknown mask output '{kind}'")
        return self.masks_dir / f"{check_name(slide_id)}.{kind}"

    # -- extract ----------------------------------------------------------------------------------
    def features_dir(self, enc_id: str) -> Path:
        return self.root / "features" / check_name(enc_id, "encoder id")

    def features(self, enc_id: str, slide_id: str) -> Path:
        return self.features_dir(enc_id) / f"{check_name(slide_id)}.h5"

    # -- train / predict --------------------------------------------------------------------------
    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def run_dir(self, run: str) -> Path:
        return self.models_dir / check_name(run, "run name")

    def out_of_fold(self, run: str) -> Path:
        """Train's out-of-fold predictions (slide_id, label, prob_<class>, pred)."""
        return self.run_dir(run) / "predictions.csv"

    def predictions(self, run: str) -> Path:
        return self.root / "predictions" / f"{check_name(run, 'run name')}.csv"

    def evaluation_dir(self, run: str, name: str) -> Path:
        """``wsi-mil evaluate``'s outputs for a run on one cohort."""
        return self.root / "evaluations" / check_name(run, "run name") / check_name(name, "evaluation name")

    # -- heatmap ----------------------------------------------------------------------------------
    def heatmap_runs(self) -> list[str]:
        """Names of the runs that have a heatmaps/ folder."""
        root = self.root / "heatmaps"
        return sorted(p.name for p in root.iterdir() if p.is_dir() and is_data_name(p.name)) if root.is_dir() else []

    def heatmaps_dir(self, run: str) -> Path:
        return self.root / "heatmaps" / check_name(run, "run name")

    def heatmap_dir(self, run: str, slide_id: str) -> Path:
        return self.heatmaps_dir(run) / check_name(slide_id)

    def heatmap_summary(self, run: str, slide_id: str) -> Path:
        return self.heatmap_dir(run, slide_id) / "summary.json"

    def heatmap_file(self, run: str, slide_id: str, name: str) -> Path:
        if name not in HEATMAP_FILES:
            raise ValueError(f"unknown heatmap output '{name}'")
        return self.heatmap_dir(run, slide_id) / name
