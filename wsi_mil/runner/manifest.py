"""``manifest.csv``: one row per (slide_id, stage), the latest outcome. Safe for concurrent runs."""

from __future__ import annotations

import csv
import fcntl
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ..atomic import restore, write_csv

FIELDS = ["slide_id", "stage", "status", "seconds", "reason"]


@dataclass
class Record:
    slide_id: str
    stage: str
    status: str  # done | failed | skipped
    seconds: float = 0.0
    reason: str = ""


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_manifest(path: str | Path) -> list[dict]:
    """The manifest's rows; unreadable bytes are replaced rather than failing (the viewer reads it live)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        return [{restore(k): restore(v) for k, v in r.items()} for r in csv.DictReader(fh)]


def update_manifest(path: str | Path, records: Iterable[Record],
                    write_if: Callable[[dict | None], bool] | None = None) -> None:
    """Upsert records under an exclusive lock, then replace the file atomically.

    ``write_if(existing_row_or_None)`` can veto a record, e.g. so a "skipped" never hides a "done".
    """
    path = Path(path)
    with _locked(path):
        rows = {(r["slide_id"], r["stage"]): r for r in read_manifest(path)}
        for rec in records:
            if write_if is not None and not write_if(rows.get((rec.slide_id, rec.stage))):
                continue
            row = asdict(rec)
            row["seconds"] = f"{rec.seconds:.3f}"
            row["reason"] = " ".join(str(rec.reason).split())
            rows[(rec.slide_id, rec.stage)] = row
        write_csv(path, [{k: rows[key].get(k, "") for k in FIELDS} for key in sorted(rows)], FIELDS)
