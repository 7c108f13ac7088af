"""Find slides: a folder (optionally recursive) by WSI extension, DICOM WSI folders, or a CSV of paths.

A folder holding DICOM files is one slide when they are one WSI series (grouped by Series Instance UID,
with a VOLUME image among them); its id is the folder's name, or the value of the DICOM attribute
``slides.dicom_id_attribute`` (e.g. ContainerIdentifier). Label, overview and thumbnail instances belong
to their series and are never slides of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import WsiMilError
from ..layout import check_name
from ..userfiles import read_csv_rows


@dataclass(frozen=True)
class SlideRef:
    slide_id: str
    path: Path


def _from_csv(path: Path) -> list[Path]:
    rows = read_csv_rows(path, "slide CSV")
    if not rows:
        return []
    column = next((c for c in ("path", "slide_path", "slide") if c in rows[0]), None)
    if column is None:
        raise WsiMilError(f"{path.name}: slide CSV needs a 'path' column")
    return [(path.parent / r[column]).resolve() if not Path(r[column]).is_absolute() else Path(r[column]) for r in rows]


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    if path.suffix or not path.is_file():
        return False
    try:
        with path.open("rb") as fh:
            return fh.read(132)[128:132] == b"DICM"  # the DICOM preamble, for files without a suffix
    except OSError:
        return False


def dicom_series(folder: Path) -> dict[str, dict]:
    """Series Instance UID -> {"volume": has a VOLUME image, "dataset": a VOLUME instance's header} for the
    DICOM files directly in ``folder`` (headers only, no pixels)."""
    import pydicom

    series: dict[str, dict] = {}
    for f in sorted(p for p in folder.iterdir() if not p.name.startswith(".") and _is_dicom(p)):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # not DICOM after all, or damaged: the reader reports the series
            continue
        entry = series.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), {"volume": False, "dataset": ds})
        if "VOLUME" in [str(t).upper() for t in getattr(ds, "ImageType", [])] and not entry["volume"]:
            entry.update(volume=True, dataset=ds)
    return series


def _dicom_slide_id(folder: Path, attribute: str | None) -> str | None:
    """The slide id of a folder holding one DICOM WSI series; None if it holds none."""
    series = {uid: e for uid, e in dicom_series(folder).items() if e["volume"]}
    if not series:
        return None
    if len(series) > 1:
        raise WsiMilError(f"{folder}: holds {len(series)} DICOM WSI series; put each series in its own folder "
                          f"(one folder = one slide)")
    if attribute:
        value = str(getattr(next(iter(series.values()))["dataset"], attribute, "") or "").strip()
        if not value:
            raise WsiMilError(f"{folder}: no DICOM attribute {attribute} (slides.dicom_id_attribute) to name it by")
        return value
    return folder.name


def _folder_paths(source: Path, extensions: list[str], recursive: bool) -> list[Path]:
    exts = {e.lower() for e in extensions}
    entries = list(source.rglob("*") if recursive else source.glob("*"))
    files = [p for p in entries if p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")]
    folders = [p for p in entries if p.is_dir() and not p.name.startswith(".") and any(map(_is_dicom, p.iterdir()))]
    return sorted(files + folders)


def discover_slides(source: str | Path, extensions: list[str], recursive: bool = False,
                    dicom_id: str | None = None) -> list[SlideRef]:
    source = Path(source)
    names: dict[Path, str] = {}
    if source.is_file() and source.suffix.lower() == ".csv":
        paths = _from_csv(source)
    elif source.is_dir() and any(map(_is_dicom, source.iterdir())):
        paths = [source]  # the folder of one DICOM WSI series itself
    elif source.is_dir():
        paths = _folder_paths(source, extensions, recursive)
    elif source.is_file():
        paths = [source]
    else:
        raise WsiMilError(f"--slides: no such folder or CSV: {source}")
    for p in paths:
        if p.is_dir():
            sid = _dicom_slide_id(p, dicom_id)
            if sid is not None:
                names[p] = sid
    paths = [p for p in paths if not p.is_dir() or p in names]  # folders of DICOM files but no WSI series
    refs: dict[str, SlideRef] = {}
    for p in paths:
        sid = check_name(names.get(p) or (p.stem if p.suffix else p.name))
        if sid in refs:
            raise WsiMilError(f"duplicate slide_id '{sid}': {refs[sid].path} and {p}; rename one of them")
        refs[sid] = SlideRef(sid, p)
    return list(refs.values())
