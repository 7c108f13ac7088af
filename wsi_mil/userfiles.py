"""Reading files a user hands us (config YAML, labels / slide / mpp CSVs, GeoJSON masks).

UTF-8, with or without a BOM (spreadsheet programs add one). Anything else, or an unreadable file, is one
line naming the file, never a traceback.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .atomic import restore
from .errors import WsiMilError


def read_text(path: str | Path, what: str) -> str:
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise WsiMilError(f"{what} {path.name}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise WsiMilError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None


def read_csv_rows(path: str | Path, what: str) -> list[dict]:
    """Rows of a CSV as dicts, header names stripped of surrounding spaces, cells our CSV writer
    neutralised against formulas restored (:func:`wsi_mil.atomic.restore`)."""
    try:
        rows = list(csv.DictReader(io.StringIO(read_text(path, what), newline="")))
    except csv.Error as exc:
        raise WsiMilError(f"{what} {Path(path).name}: not a valid CSV ({exc})") from None
    return [{restore((k or "").strip()): restore(v) for k, v in r.items()} for r in rows]


def read_json(path: str | Path, what: str):
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as exc:
        raise WsiMilError(f"{what} {Path(path).name}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
