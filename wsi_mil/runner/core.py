"""The batch runner every stage goes through: resume, locks, manifest, progress, executors.

A stage supplies a per-slide function and where its one "done" output lives. That output is written
atomically and last, so its existence means the slide is complete for that stage.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..atomic import clean_stale_temps
from ..errors import one_line
from ..slide.discover import SlideRef
from .executors import Executor, SerialExecutor
from .locks import SlideLock
from .manifest import Record, update_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    stage: str
    slide: SlideRef
    output: Path
    lock: Path
    overwrite: bool = False


@dataclass
class BatchResult:
    stage: str
    records: list[Record] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.records)

    @property
    def ok(self) -> bool:
        return self.count("failed") == 0

    def summary(self) -> str:
        line = (f"{self.stage}: {self.count('done')} done, {self.count('failed')} failed, "
                f"{self.count('skipped')} skipped in {self.seconds:.1f} s")
        if not self.ok:
            failed = ", ".join(r.slide_id for r in self.records if r.status == "failed")
            line += f"; failed: {failed} (reasons in manifest.csv)"
        return line


def run_task(fn: Callable[[SlideRef], str | None], task: Task) -> Record:
    """Run one slide under its lock. Never raises: failures become a record with a one-line reason."""
    sid = task.slide.slide_id
    if not task.overwrite and task.output.exists():
        return Record(sid, task.stage, "skipped", 0.0, "complete output exists")
    lock = SlideLock(task.lock)
    if not lock.acquire():
        holder = lock.holder() or {}
        return Record(sid, task.stage, "skipped", 0.0,
                      f"locked by pid {holder.get('pid', '?')} on {holder.get('host', '?')}")
    t0 = time.perf_counter()
    try:
        if not task.overwrite and task.output.exists():  # another run finished it while we waited
            return Record(sid, task.stage, "skipped", 0.0, "complete output exists")
        note = fn(task.slide)
        return Record(sid, task.stage, "done", time.perf_counter() - t0, note or "")
    except Exception as exc:  # one bad slide never stops the batch
        log.debug("slide %s failed", sid, exc_info=True)
        return Record(sid, task.stage, "failed", time.perf_counter() - t0, one_line(exc))
    finally:
        lock.release()


class _Bound:
    """Picklable ``task -> run_task(fn, task)``."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, task: Task) -> Record:
        return run_task(self.fn, task)


def _manifest_view(record: Record, task: Task) -> Record:
    """A slide skipped because its complete output exists is done (e.g. finished just before a crash)."""
    if record.status == "skipped" and task.output.exists():
        return Record(record.slide_id, record.stage, "done", record.seconds, "complete output exists")
    return record


def _write_if(record: Record):
    """Skips only fill gaps: they never overwrite a row that already says done."""
    if record.status != "skipped":
        return None
    return lambda row: row is None or row.get("status") != "done"


def run_batch(
    stage: str,
    slides: list[SlideRef],
    fn: Callable[[SlideRef], str | None],
    output_for: Callable[[str], Path],
    out_dir: Path,
    executor: Executor | None = None,
    overwrite: bool = False,
    clean_dirs: list[Path] | None = None,
    progress: bool = True,
) -> BatchResult:
    """Process ``slides`` with ``fn``; record every outcome in ``out_dir/manifest.csv``."""
    out_dir = Path(out_dir)
    executor = executor or SerialExecutor()
    for folder in clean_dirs or []:
        n = clean_stale_temps(folder)
        if n:
            log.info("%s: removed %d temp file(s) left by an interrupted run", stage, n)
    tasks = [Task(stage, s, output_for(s.slide_id), out_dir / ".locks" / stage / f"{s.slide_id}.lock", overwrite)
             for s in slides]
    manifest = out_dir / "manifest.csv"
    result = BatchResult(stage)
    t0 = time.perf_counter()

    def lost(task: Task, reason: str) -> Record:
        return Record(task.slide.slide_id, stage, "failed", 0.0, reason)

    bar = tqdm(total=len(tasks), desc=stage, unit="slide", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)
    try:
        for _task, record in executor.imap(_Bound(fn), tasks, lost):
            result.records.append(record)
            update_manifest(manifest, [_manifest_view(record, _task)], _write_if(record))
            if record.status == "failed":
                tqdm.write(f"failed: {record.slide_id} ({stage}): {record.reason}", file=sys.stderr)
            bar.update(1)
            bar.set_postfix(done=result.count("done"), failed=result.count("failed"), refresh=False)
    finally:
        bar.close()
        executor.close()
    result.seconds = time.perf_counter() - t0
    return result
