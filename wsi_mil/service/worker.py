"""The service's worker (a process of its own, :func:`work`): it takes the oldest queued job and runs its slides, one at a time, through
the stages ``wsi-mil run`` uses (tile -> extract -> predict -> heatmap), into the same study layout, so
``wsi-mil view`` shows them. One slide at a time keeps one GPU from being oversubscribed.

The trained model is resolved and loaded once, when the service starts; each slide's prediction row is
exactly ``wsi-mil predict``'s (:func:`wsi_mil.stages.predict.predict_file`) and is merged into
``predictions/<run>.csv`` as the slide finishes.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from ..atomic import write_csv
from ..config import Config
from ..device import pick_device
from ..errors import one_line
from ..layout import Layout
from ..mil.ensemble import Ensemble, ModelRef
from ..runner.lifetime import end_with
from ..slide import SlideRef
from ..stages import extract, heatmap, tile
from ..stages.base import run_stage
from ..stages.predict import predict_file
from ..userfiles import read_csv_rows
from .jobs import JobStore, remove_uploads

log = logging.getLogger(__name__)


def work(db: Path, out: Path, cfg: Config, model: ModelRef, server: int | None = None) -> None:
    """The worker process: its own connection to the queue, the model loaded once, jobs until killed. Apart
    from the server's process, so the stages never hold the server's interpreter lock while it answers.
    It ends when the server process (pid ``server``) does, however that is stopped."""
    if server is not None:
        end_with(server)
    Worker(JobStore(db), Layout(out), cfg, model).run()


class Worker(threading.Thread):
    def __init__(self, store: JobStore, layout: Layout, cfg: Config, model: ModelRef):
        super().__init__(name="wsi-mil-service-worker", daemon=True)
        self.store, self.layout, self.cfg, self.model = store, layout, cfg, model
        self.ensemble = Ensemble(model, pick_device(cfg.train.device))  # loaded once
        self.heatmap = heatmap.heatmap_stage(Path(model.path).resolve())
        self.wake, self.stopping = threading.Event(), threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            job = self.store.claim()
            if job is None:
                self.wake.wait(0.2)  # the queue is polled: submissions come from the server process
                self.wake.clear()
                continue
            self.run_job(job)

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def run_job(self, job: str) -> None:
        while not self.stopping.is_set():
            item = self.store.next_slide(job)
            if item is None:
                self.store.finish_job(job)
                remove_uploads(self.store.paths(job), self.layout.uploads_dir)  # its results are in the layout
                return
            pos, slide_id, path = item
            try:
                status, reason, row = self.process(job, pos, SlideRef(slide_id, Path(path)))
            except Exception as exc:  # one bad slide never stops the job
                log.debug("slide %s failed", slide_id, exc_info=True)
                status, reason, row = "failed", one_line(exc), None
            self.store.finish_slide(job, pos, status, reason, row)

    def process(self, job: str, pos: int, ref: SlideRef) -> tuple[str, str, dict | None]:
        """(status, reason, prediction row) of one slide through every stage."""
        for stage in (tile.STAGE, extract.STAGE):
            self.store.set_stage(job, pos, stage.name)
            failed = _failure(run_stage(stage, [ref], self.cfg, self.layout, progress=False))
            if failed:
                return "failed", f"{stage.name}: {failed}", None
        self.store.set_stage(job, pos, "predict")
        row = predict_file(self.ensemble, self.layout.features(self.ensemble.meta.encoder_id, ref.slide_id))
        self._merge_prediction(row)
        self.store.set_stage(job, pos, "heatmap")
        failed = _failure(run_stage(self.heatmap, [ref], self.cfg, self.layout, progress=False))
        if failed and row.get("n_patches"):
            return "failed", f"heatmap: {failed}", row
        return "done", "", row

    def _merge_prediction(self, row: dict) -> None:
        """The slide's row into ``predictions/<run>.csv`` (others kept; only this thread writes it)."""
        path = self.layout.predictions(self.model.name)
        rows = read_csv_rows(path, "predictions") if path.is_file() else []
        rows = [r for r in rows if r.get("slide_id") != row["slide_id"]] + [row]
        write_csv(path, rows, ["slide_id", *self.ensemble.task.ensemble_columns(), "n_patches", "model_id", "note"])


def _failure(result) -> str | None:
    bad = [r for r in result.records if r.status == "failed"]
    return bad[0].reason if bad else None
