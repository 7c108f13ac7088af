"""Atomic outputs: write to a temp name in the same folder, then ``os.replace`` onto the final name.

A file that exists under its final name is therefore always complete. Temp names carry the host and pid
of their writer, so a later run can tell a dead writer's leftovers from a live one's. Only names of exactly
our temp form are ever cleaned up, and never a path the caller names as an input.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())
TMP_TAG = ".wsi_mil-tmp-"
_TEMP = re.compile(r"^\.(?P<stem>.+)" + re.escape(TMP_TAG) + r"(?P<host>[A-Za-z0-9_]+)-(?P<pid>[0-9]+)(?P<suffix>\.[^.]*)?$")


def temp_name(final: Path) -> Path:
    """``dir/.name.wsi_mil-tmp-HOST-PID.ext``: same folder (same filesystem), same extension (for encoders)."""
    suffix = "".join(final.suffixes[-1:])
    stem = final.name[: len(final.name) - len(suffix)] if suffix else final.name
    return final.with_name(f".{stem}{TMP_TAG}{HOST}-{os.getpid()}{suffix}")


def parse_temp(name: str) -> tuple[str, int] | None:
    """(host, pid) of a temp name of ours, or None for any other name."""
    m = _TEMP.match(name)
    return (m["host"], int(m["pid"])) if m else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temp path to write; on success it is renamed onto ``final``, on error removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    _remove(tmp)
    try:
        yield tmp
        if final.is_dir() and tmp.is_dir():
            # a folder (a run, an OME-Zarr) cannot replace a non-empty one in one step: move the old one
            # aside under a temp name, move the new one in, then delete the old; never a mix of the two
            old = temp_name(final.with_name(final.name + "-old"))
            _remove(old)
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
            return
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def write_bytes(final: str | Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_text(final: str | Path, text: str) -> None:
    write_bytes(final, text.encode())


def plain_json(value):
    """``value`` as strict JSON holds it: numpy numbers as Python's, and an undefined figure (NaN or an
    infinity: the AUROC of a fold or cohort with one class) as null. NaN is not JSON (RFC 8259): browsers'
    ``JSON.parse``, jq and strict readers refuse a file holding it."""
    import math

    if isinstance(value, dict):
        return {k: plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0:
        value = value.item()  # a numpy scalar
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(final: str | Path, value, indent: int | None = 1):
    """The one JSON writer of our outputs: :func:`plain_json` of ``value``, atomically; ``allow_nan=False``
    guards that nothing non-finite gets through. Returns what it wrote (the plain value)."""
    import json

    plain = plain_json(value)
    write_text(final, json.dumps(plain, indent=indent, allow_nan=False))
    return plain


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def neutralise(value):
    """A CSV cell that a spreadsheet will not run (OWASP, "CSV injection").

    Text starting with ``= + - @``, tab or CR gets a leading ``'``, so Excel and LibreOffice show it as
    text. Text already starting with ``'`` gets one more, so :func:`restore` is its exact inverse. Numbers
    (``-0.5``, ``+3e-2``) are left as they are: a spreadsheet reads them as numbers, not formulas.
    """
    if not isinstance(value, str) or not value:
        return value
    if value[0] == "'" or (value[0] in FORMULA_START and not _NUMBER.match(value)):
        return "'" + value
    return value


def restore(value):
    """The text :func:`neutralise` was given (every reader of our CSVs applies it to each cell)."""
    if isinstance(value, str) and len(value) > 1 and value[0] == "'" and value[1] in ("'", *FORMULA_START):
        return value[1:]
    return value


def write_csv(final: str | Path, rows: list[dict], fields: list[str] | None = None) -> None:
    """Rows (dicts) as CSV with a header, atomically; ``fields`` default to the first row's keys.

    The one CSV writer: every cell (and header) goes through :func:`neutralise`."""
    import csv
    import io

    buf = io.StringIO()
    fields = fields or (list(rows[0]) if rows else [])
    if fields:
        writer = csv.writer(buf)
        writer.writerow([neutralise(f) for f in fields])
        writer.writerows([neutralise(row.get(f, "")) for f in fields] for row in rows)
    write_text(final, buf.getvalue())


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temps(folder: str | Path, keep: set[Path] | frozenset = frozenset()) -> Iterator[Path]:
    """Temp files of ours under ``folder`` whose writer on this host is dead; ``keep`` (inputs) never."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    keep = {Path(p).resolve() for p in keep}
    for path in folder.rglob(f".*{TMP_TAG}*"):
        parsed = parse_temp(path.name)
        if parsed is None or path.resolve() in keep:
            continue
        host, pid = parsed
        if host != HOST or pid_alive(pid):
            continue  # a live writer, or another machine's (left to that machine)
        yield path


def clean_stale_temps(folder: str | Path, keep: set[Path] | frozenset = frozenset()) -> int:
    n = 0
    for path in list(stale_temps(folder, keep)):
        _remove(path)
        n += 1
    return n


def clean_stale_temps_of(final: str | Path) -> int:
    """Remove what dead writers on this host left for one output: ``final``'s temp names (and those of the
    old copy a folder swap moves aside), in ``final``'s own folder only."""
    final = Path(final)
    if not final.parent.is_dir():
        return 0
    wanted, n = {final.name, final.name + "-old"}, 0
    for path in list(final.parent.glob(f".*{TMP_TAG}*")):
        m = _TEMP.match(path.name)
        if m is None or m["stem"] + (m["suffix"] or "") not in wanted:
            continue
        if m["host"] == HOST and not pid_alive(int(m["pid"])):
            _remove(path)
            n += 1
    return n
