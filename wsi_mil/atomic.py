"""Atomic outputs: write to a temp name in the same folder, then ``os.replace`` onto the final name.

A file that exists under its final name is therefore always complete. Temp names carry the host and pid
of their writer, so a later run can tell a dead writer's leftovers from a live one's.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOST = socket.gethostname().replace("-", "_").replace(".", "_")
TMP_TAG = ".tmp-"


def temp_name(final: Path) -> Path:
    """``dir/.name.tmp-HOST-PID.ext``: same folder (same filesystem), same extension (for encoders)."""
    suffix = "".join(final.suffixes[-1:])
    stem = final.name[: len(final.name) - len(suffix)] if suffix else final.name
    return final.with_name(f".{stem}{TMP_TAG}{HOST}-{os.getpid()}{suffix}")


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
            _remove(final)  # directories (e.g. OME-Zarr) cannot be replaced in one step
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def write_bytes(final: str | Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_text(final: str | Path, text: str) -> None:
    write_bytes(final, text.encode())


def write_csv(final: str | Path, rows: list[dict], fields: list[str] | None = None) -> None:
    """Rows (dicts) as CSV with a header, atomically; ``fields`` default to the first row's keys."""
    import csv
    import io

    buf = io.StringIO()
    fields = fields or (list(rows[0]) if rows else [])
    if fields:
        writer = csv.DictWriter(buf, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    write_text(final, buf.getvalue())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temps(folder: str | Path) -> Iterator[Path]:
    """Temp files under ``folder`` whose writer on this host is dead (or that belong to no known pid)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.rglob(f".*{TMP_TAG}*"):
        tag = path.name.split(TMP_TAG, 1)[1]
        host, _, rest = tag.rpartition("-")
        pid_text = rest.split(".", 1)[0]
        if host == HOST and pid_text.isdigit() and pid_alive(int(pid_text)):
            continue
        if host != HOST and host:
            continue  # another machine's writer: leave it to that machine
        yield path


def clean_stale_temps(folder: str | Path) -> int:
    n = 0
    for path in list(stale_temps(folder)):
        _remove(path)
        n += 1
    return n
