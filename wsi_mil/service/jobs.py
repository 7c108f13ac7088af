"""The prediction service's job queue: one SQLite file in WAL mode (``OUT/service/jobs.sqlite``), so the
queue outlives the server. A job is a list of slides; each slide moves queued -> running -> done | failed
(or cancelled). Every change is one transaction, so a server killed at any moment leaves each row as it
was before or after a change; on restart, :meth:`JobStore.recover` puts whatever was running back in the
queue, and the stages' atomic outputs make the rerun redo only what was not finished.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, status TEXT NOT NULL, created REAL NOT NULL,
                                 updated REAL NOT NULL, cancel INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS slides (job_id TEXT NOT NULL, pos INTEGER NOT NULL, slide_id TEXT NOT NULL,
                                   path TEXT NOT NULL, status TEXT NOT NULL, stage TEXT, reason TEXT,
                                   prediction TEXT, runs INTEGER NOT NULL DEFAULT 0,
                                   PRIMARY KEY (job_id, pos));
"""
OPEN = ("queued", "running")


class QueueFull(Exception):
    """The queue holds as many open jobs as it may (the service answers 429)."""


class JobStore:
    """Thread-safe access to the queue (one connection, one lock; every call is short)."""

    def __init__(self, path: Path, max_open: int = 16):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.max_open, self._lock = max_open, threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def _tx(self, fn):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self._db)
                self._db.execute("COMMIT")
                return out
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def submit(self, slides: list[tuple[str, str]]) -> str:
        """A new queued job of ``(slide_id, path)`` pairs; :class:`QueueFull` past ``max_open`` open jobs."""
        job, now = uuid.uuid4().hex, time.time()

        def add(db):
            (n,) = db.execute("SELECT count(*) FROM jobs WHERE status IN (?, ?)", OPEN).fetchone()
            if n >= self.max_open:
                raise QueueFull(f"{n} jobs are queued or running (the most --max-queue allows)")
            db.execute("INSERT INTO jobs VALUES (?, 'queued', ?, ?, 0)", (job, now, now))
            db.executemany("INSERT INTO slides (job_id, pos, slide_id, path, status) VALUES (?, ?, ?, ?, 'queued')",
                           [(job, i, sid, path) for i, (sid, path) in enumerate(slides)])
        self._tx(add)
        return job

    def recover(self) -> int:
        """After a restart: running jobs and slides go back to the queue; the number of jobs requeued."""
        def fix(db):
            db.execute("UPDATE slides SET status='queued', stage=NULL WHERE status='running'")
            return db.execute("UPDATE jobs SET status='queued' WHERE status='running'").rowcount
        return self._tx(fix)

    def claim(self) -> str | None:
        """The oldest queued job, now running (None when the queue is empty)."""
        def take(db):
            row = db.execute("SELECT id FROM jobs WHERE status='queued' ORDER BY created LIMIT 1").fetchone()
            if row:
                db.execute("UPDATE jobs SET status='running', updated=? WHERE id=?", (time.time(), row[0]))
            return row[0] if row else None
        return self._tx(take)

    def next_slide(self, job: str) -> tuple[int, str, str] | None:
        """The job's next queued slide (pos, slide_id, path), marked running; None when none is left or the
        job was cancelled (its queued slides are then marked cancelled)."""
        def take(db):
            (cancel,) = db.execute("SELECT cancel FROM jobs WHERE id=?", (job,)).fetchone()
            if cancel:
                db.execute("UPDATE slides SET status='cancelled' WHERE job_id=? AND status='queued'", (job,))
                return None
            row = db.execute("SELECT pos, slide_id, path FROM slides WHERE job_id=? AND status='queued' "
                             "ORDER BY pos LIMIT 1", (job,)).fetchone()
            if row:
                db.execute("UPDATE slides SET status='running', runs=runs+1 WHERE job_id=? AND pos=?", (job, row[0]))
            return row
        return self._tx(take)

    def set_stage(self, job: str, pos: int, stage: str) -> None:
        self._tx(lambda db: db.execute("UPDATE slides SET stage=? WHERE job_id=? AND pos=?", (stage, job, pos)))

    def finish_slide(self, job: str, pos: int, status: str, reason: str = "", prediction: dict | None = None) -> None:
        self._tx(lambda db: db.execute(
            "UPDATE slides SET status=?, reason=?, prediction=? WHERE job_id=? AND pos=?",
            (status, reason, json.dumps(prediction) if prediction is not None else None, job, pos)))

    def finish_job(self, job: str) -> None:
        """done when every slide is done; failed when any failed; cancelled when it was cancelled."""
        def close(db):
            states = {s for (s,) in db.execute("SELECT status FROM slides WHERE job_id=?", (job,))}
            (cancel,) = db.execute("SELECT cancel FROM jobs WHERE id=?", (job,)).fetchone()
            status = "cancelled" if cancel else ("failed" if "failed" in states else "done")
            db.execute("UPDATE jobs SET status=?, updated=? WHERE id=?", (status, time.time(), job))
        self._tx(close)

    def cancel(self, job: str) -> bool:
        """Ask a job to stop (its running slide finishes, the rest are cancelled); False if unknown."""
        def ask(db):
            row = db.execute("SELECT status FROM jobs WHERE id=?", (job,)).fetchone()
            if row is None:
                return False
            db.execute("UPDATE jobs SET cancel=1, updated=? WHERE id=?", (time.time(), job))
            if row[0] == "queued":
                db.execute("UPDATE slides SET status='cancelled' WHERE job_id=? AND status='queued'", (job,))
                db.execute("UPDATE jobs SET status='cancelled' WHERE id=?", (job,))
            return True
        return self._tx(ask)

    def paths(self, job: str) -> list[str]:
        """The slide paths (or DICOMweb references) a job was given."""
        with self._lock:
            return [p for (p,) in self._db.execute("SELECT path FROM slides WHERE job_id=? ORDER BY pos", (job,))]

    def get(self, job: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT id, status, created, updated FROM jobs WHERE id=?", (job,)).fetchone()
            if row is None:
                return None
            slides = self._db.execute("SELECT slide_id, status, stage, reason, prediction, runs FROM slides "
                                      "WHERE job_id=? ORDER BY pos", (job,)).fetchall()
        return {"id": row[0], "status": row[1], "created": row[2], "updated": row[3],
                "slides": [{"slide_id": s[0], "status": s[1], "stage": s[2], "reason": s[3] or "",
                            "prediction": json.loads(s[4]) if s[4] else None, "runs": s[5]} for s in slides]}

    def list(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT j.id, j.status, j.created, count(s.pos) FROM jobs j "
                                    "LEFT JOIN slides s ON s.job_id = j.id GROUP BY j.id ORDER BY j.created").fetchall()
        return [{"id": r[0], "status": r[1], "created": r[2], "n_slides": r[3]} for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def remove_uploads(paths: list[str], root: Path) -> None:
    """Remove the upload folders (the direct children of ``root``) that hold any of ``paths``, once their
    job has ended: slides given by path under a ``--slides-root``, and DICOMweb references, are never
    touched."""
    root = Path(root).resolve()
    for raw in paths:
        try:
            folder = Path(raw).resolve().parent
        except (OSError, ValueError):
            continue
        if folder.parent == root:
            shutil.rmtree(folder, ignore_errors=True)

