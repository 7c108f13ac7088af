"""Find slides: a folder (optionally recursive) by WSI extension, DICOM WSI folders, or a CSV of paths
and DICOMweb series.

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


def _from_csv(path: Path) -> list[tuple[Path | str, str | None]]:
    """(slide path, slide_id or None) per row: a ``path`` column (files or DICOM folders), or DICOMweb rows
    (``slide_id, dicomweb_url, study_uid, series_uid``; see :mod:`.dicomweb`); the two may be mixed."""
    from .dicomweb import from_csv_row

    rows = read_csv_rows(path, "slide CSV")
    if not rows:
        return []
    column = next((c for c in ("path", "slide_path", "slide") if c in rows[0]), None)
    web = "dicomweb_url" in rows[0]
    if column is None and not web:
        raise WsiMilError(f"{path.name}: slide CSV needs a 'path' column, or slide_id,dicomweb_url,study_uid,series_uid")
    out: list[tuple[Path | str, str | None]] = []
    for line, r in enumerate(rows, start=2):
        given = str(r.get(column) or "").strip() if column else ""
        if web and not given:
            sid = str(r.get("slide_id") or "").strip()
            if not sid:
                raise WsiMilError(f"{path.name} line {line}: a DICOMweb row needs its slide_id")
            out.append((from_csv_row(r, path.name, line).locator, sid))
        else:
            p = Path(given)
            out.append(((path.parent / p).resolve() if not p.is_absolute() else p, str(r.get("slide_id") or "") or None))
    return out


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


def _candidates(source: Path, extensions: list[str], recursive: bool) -> list[tuple[Path | str, str | None]]:
    """(path, slide_id when the source names it) for every candidate slide of ``--slides``."""
    if source.is_file() and source.suffix.lower() == ".csv":
        return [(p, sid if isinstance(p, str) else None) for p, sid in _from_csv(source)]  # DICOMweb: its slide_id
    if source.is_dir() and any(map(_is_dicom, source.iterdir())):
        return [(source, None)]  # the folder of one DICOM WSI series itself
    if source.is_dir():
        return [(p, None) for p in _folder_paths(source, extensions, recursive)]
    if source.is_file():
        return [(source, None)]
    raise WsiMilError(f"--slides: no such folder or CSV: {source}")


def discover_slides(source: str | Path, extensions: list[str], recursive: bool = False,
                    dicom_id: str | None = None) -> list[SlideRef]:
    refs: dict[str, SlideRef] = {}
    for p, sid in _candidates(Path(source), extensions, recursive):
        if isinstance(p, Path) and p.is_dir():
            sid = _dicom_slide_id(p, dicom_id)
            if sid is None:  # DICOM files, but no WSI series
                continue
        sid = check_name(sid or (p.stem if p.suffix else p.name))
        p = Path(p) if isinstance(p, str) else p  # a DICOMweb locator travels as a path (see .dicomweb)
        if sid in refs:
            raise WsiMilError(f"duplicate slide_id '{sid}': {refs[sid].path} and {p}; rename one of them")
        refs[sid] = SlideRef(sid, p)
    return list(refs.values())
