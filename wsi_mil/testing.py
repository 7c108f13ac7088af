"""Helpers for fault-injection tests (importable by worker processes, which test files are not)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .atomic import write_text


class FaultyTask:
    """A per-slide function that writes ``<out>/<slide_id>.done``, logs every start to ``log``, and kills
    its own process on chosen slides: always (``die_always``) or on the first attempt only (``die_once``)."""

    def __init__(self, out: Path, log: Path | None = None, die_once=(), die_always=(), sleep: float = 0.0):
        self.out, self.log, self.sleep = Path(out), log, sleep
        self.die_once, self.die_always = set(die_once), set(die_always)

    def output(self, slide_id: str) -> Path:
        return self.out / f"{slide_id}.done"

    def __call__(self, slide) -> str:
        sid = slide.slide_id
        if self.log is not None:
            with open(self.log, "a") as fh:
                fh.write(f"{sid} {os.getpid()}\n")
        marker = self.out / f".{sid}.died"
        if sid in self.die_always or (sid in self.die_once and not marker.exists()):
            marker.touch()
            os._exit(137)  # like SIGKILL / the OOM killer: no cleanup, no exception
        time.sleep(self.sleep)
        write_text(self.output(sid), f"{sid}\n")
        return "ok"
