"""Per-slide locks: an ``flock`` on a lock file that records pid, host and time.

The kernel drops an flock when its process dies, so a lock file left by a dead process is simply
re-locked by the next run (stale locks are reclaimed without guessing from ages). After locking we check
that the file we hold is still the one at the path, which closes the unlink/relock race. ``sweep`` removes
the lock files whose holder is gone (a process killed between its output's rename and its unlock), so
they do not outlive the run that left them.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from ..atomic import HOST


class SlideLock:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text() or "null")
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (unlinked) between our open and lock: retry
                os.close(fd)
                continue
            try:  # who holds it, for humans; the flock alone is the lock (so a full disk cannot break it)
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps({"pid": os.getpid(), "host": HOST, "time": time.time()}).encode())
            except OSError:
                pass
            self._fd = fd
            return True

    @staticmethod
    def sweep(folder: str | Path) -> int:
        """Remove every lock file under ``folder`` that no live process holds; returns how many."""
        folder = Path(folder)
        n = 0
        for path in sorted(folder.glob("*.lock")) if folder.is_dir() else []:
            lock = SlideLock(path)
            if lock.acquire():  # nobody holds it: the kernel dropped a dead holder's flock
                lock.release()  # unlinks it
                n += 1
        return n

    def release(self) -> None:
        if self._fd is not None:
            try:
                self.path.unlink(missing_ok=True)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> SlideLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
