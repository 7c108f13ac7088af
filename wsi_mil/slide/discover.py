"""Find slides: a folder (optionally recursive) by WSI extension, or a CSV of paths."""

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


def discover_slides(source: str | Path, extensions: list[str], recursive: bool = False) -> list[SlideRef]:
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        paths = _from_csv(source)
    elif source.is_dir():
        exts = {e.lower() for e in extensions}
        pattern = source.rglob("*") if recursive else source.glob("*")
        paths = sorted(p for p in pattern if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."))
    elif source.is_file():
        paths = [source]
    else:
        raise WsiMilError(f"--slides: no such folder or CSV: {source}")
    refs: dict[str, SlideRef] = {}
    for p in paths:
        sid = check_name(p.stem if p.suffix else p.name)
        if sid in refs:
            raise WsiMilError(f"duplicate slide_id '{sid}': {refs[sid].path} and {p}; rename one of them")
        refs[sid] = SlideRef(sid, p)
    return list(refs.values())
