"""Which slides form one bag for a model trained on patient bags (``train.bag_level=patient``).

``predict``, ``heatmap`` and ``run`` take the bag level from the run's own config, and the slide ->
patient map from a CSV with ``slide_id`` and ``patient_id`` columns: ``train.labels`` when given, else
the labels file the run was trained with (its recorded ``train.labels``), if it is still there. A slide
the CSV does not list is a patient of its own (its bag is that slide); predict's note says so.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import WsiMilError
from ..userfiles import read_csv_rows


def bag_level(meta) -> str:
    """``slide`` or ``patient``: the run's ``train.bag_level`` (older runs: slide)."""
    return str(((meta.config or {}).get("train") or {}).get("bag_level") or "slide")


def read_patients(path: str | Path) -> dict[str, str]:
    """slide_id -> patient_id from a CSV (rows with an empty patient_id are their own patient)."""
    path = Path(path)
    if not path.is_file():
        raise WsiMilError(f"train.labels: file not found: {path} (needed for the slide -> patient map)")
    rows = read_csv_rows(path, "train.labels")
    if not rows or not {"slide_id", "patient_id"} <= set(rows[0]):
        raise WsiMilError(f"{path.name}: a patient-level model needs slide_id,patient_id columns to group slides")
    out = {}
    for r in rows:
        sid = str(r.get("slide_id") or "").strip()
        if sid:
            out[sid] = str(r.get("patient_id") or "").strip() or sid
    return out


def patient_map(meta, labels: str | Path | None) -> dict[str, str] | None:
    """The slide -> patient map a model's bags need: None for slide-level runs; for patient-level runs from
    ``labels`` (``train.labels``) or the run's recorded labels file, else one line saying what to pass."""
    if bag_level(meta) != "patient":
        return None
    recorded = ((meta.config or {}).get("train") or {}).get("labels")
    for path in (labels, recorded):
        if path and Path(path).is_file():
            return read_patients(path)
    raise WsiMilError("this model was trained on patient bags (train.bag_level=patient): pass "
                      "train.labels=<CSV with slide_id,patient_id> so its slides are grouped by patient")


def group_slides(slide_ids: list[str], patients: dict[str, str]) -> dict[str, list[str]]:
    """patient_id -> its slides among ``slide_ids`` in the CSV's row order (training's: the order a patient's
    slides were read as one bag); unlisted slides alone, after them."""
    order = {sid: i for i, sid in enumerate(patients)}
    groups: dict[str, list[str]] = {}
    for sid in sorted(slide_ids, key=lambda s: (order.get(s, len(order)), s)):
        groups.setdefault(patients.get(sid, sid), []).append(sid)
    return groups
