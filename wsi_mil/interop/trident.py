"""TRIDENT's layout: ``<job>/<mag>x_<ps>px_<overlap>px_overlap/patches/<slide>_patches.h5`` and
``.../features_<encoder>/<slide>.h5``. Our patch and feature files are read by TRIDENT unchanged (their
``coords`` carry ``level0_magnification`` / ``target_magnification``), so both are links. The folder is
named after our target description (``10 / target_mpp`` x, ``tiling.patch_size`` px)."""

from __future__ import annotations

from pathlib import Path

from ..formats import PatchSpec
from . import Study, link, register_format


def _mag(m: float) -> str:
    return str(int(round(m))) if abs(m - round(m)) < 1e-6 else f"{m:g}"


def folder_name(spec: PatchSpec) -> str:
    ps = spec.patch_size_target or spec.patch_size
    overlap = int(round(ps * spec.overlap_fraction))
    return f"{_mag(10.0 / spec.target_mpp)}x_{ps}px_{overlap}px_overlap"


@register_format("trident")
def export(study: Study, to: Path) -> str:
    ids = study.slide_ids()
    folders = set()
    for sid in ids:
        job = to / folder_name(study.target(sid))
        folders.add(job.name)
        link(study.layout.patches(sid), job / "patches" / f"{sid}_patches.h5")
        link(study.layout.features(study.encoder_id, sid), job / f"features_{study.encoder_id}" / f"{sid}.h5")
    return f"trident: {len(ids)} slides in {', '.join(sorted(folders))}"
