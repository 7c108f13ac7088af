"""The batch runner every stage goes through: resume, locks, manifest, progress, executors.

A stage supplies a per-slide function, where its one "done" output lives, and optionally a check that
an existing output is really complete (it opens, has the expected datasets and shapes, came from the
current model). That output is written atomically and last; resuming skips only outputs that pass.
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
from ..layout import Layout
from ..slide.discover import SlideRef
from .base import Executor
from .executors import SerialExecutor
from .locks import SlideLock
from .manifest import Record, update_manifest

log = logging.getLogger(__name__)


def exists(path: Path) -> bool:
    return path.exists()


@dataclass(frozen=True)
class Task:
    stage: str
    slide: SlideRef
    output: Path
    lock: Path
    overwrite: bool = False
    complete: Callable[[Path], bool] = exists  # picklable; an output that fails it is redone

    def done(self) -> bool:
        return self.state()[0]

    def state(self) -> tuple[bool, str]:
        """(is the existing output complete?, why not: '' when there is no output). A check says why by
        raising; one that cannot even read the output makes it incomplete too."""
        if not self.output.exists():
            return False, ""
        try:
            return bool(self.complete(self.output)), "it failed its completeness check"
        except Exception as exc:
            return False, one_line(exc)


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
    done, why = (False, "") if task.overwrite else task.state()
    if done:
        return Record(sid, task.stage, "skipped", 0.0, "complete output exists")
    lock = SlideLock(task.lock)
    try:
        acquired = lock.acquire()
    except OSError as exc:  # e.g. the output folder became read-only or vanished
        return Record(sid, task.stage, "failed", 0.0, f"cannot lock: {one_line(exc)}")
    if not acquired:
        holder = lock.holder() or {}
        return Record(sid, task.stage, "skipped", 0.0,
                      f"locked by pid {holder.get('pid', '?')} on {holder.get('host', '?')}")
    t0 = time.perf_counter()
    try:
        if not task.overwrite and task.done():  # another run finished it while we waited
            return Record(sid, task.stage, "skipped", 0.0, "complete output exists")
        note = fn(task.slide) or ""
        if why:  # an existing output was not taken as done: say why it was redone
            note = f"redone ({why})" + (f": {note}" if note else "")
        return Record(sid, task.stage, "done", time.perf_counter() - t0, note)
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
    if record.status == "skipped" and task.done():
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
    complete: Callable[[Path], bool] = exists,
) -> BatchResult:
    """Process ``slides`` with ``fn``; record every outcome in ``out_dir/manifest.csv``."""
    layout = Layout(out_dir)
    executor = executor or SerialExecutor()
    inputs = {s.path for s in slides}
    for folder in clean_dirs or []:
        n = clean_stale_temps(folder, keep=inputs)
        if n:
            log.info("%s: removed %d temp file(s) left by an interrupted run", stage, n)
    swept = SlideLock.sweep(layout.lock(stage, "x").parent)
    if swept:
        log.info("%s: removed %d lock file(s) left by dead processes", stage, swept)
    tasks = [Task(stage, s, output_for(s.slide_id), layout.lock(stage, s.slide_id), overwrite, complete)
             for s in slides]
    manifest = layout.manifest
    result = BatchResult(stage)
    t0 = time.perf_counter()

    def lost(task: Task, reason: str) -> Record:
        return Record(task.slide.slide_id, stage, "failed", 0.0, reason)

    bar = tqdm(total=len(tasks), desc=stage, unit="slide", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)
    unrecorded: list[tuple[Record, Record]] = []

    def record_row(record: Record, view: Record) -> None:
        try:
            update_manifest(manifest, [view], _write_if(record))
        except OSError as exc:  # a full disk must not stop the batch: keep the row, retry at the end
            if not unrecorded:
                tqdm.write(f"warning: cannot update {manifest.name} ({one_line(exc)}); will retry", file=sys.stderr)
            unrecorded.append((record, view))

    try:
        for _task, record in executor.imap(_Bound(fn), tasks, lost):
            result.records.append(record)
            record_row(record, _manifest_view(record, _task))
            if record.status == "failed":
                tqdm.write(f"failed: {record.slide_id} ({stage}): {record.reason}", file=sys.stderr)
            bar.update(1)
            bar.set_postfix(done=result.count("done"), failed=result.count("failed"), refresh=False)
    finally:
        bar.close()
        executor.close()
    pending, unrecorded = unrecorded, []
    for record, view in pending:
        record_row(record, view)
    if unrecorded:
        tqdm.write(f"warning: {len(unrecorded)} outcome(s) could not be written to {manifest}", file=sys.stderr)
    result.seconds = time.perf_counter() - t0
    return result
