"""``wsi-mil serve``'s HTTP API (FastAPI; OpenAPI docs at ``/docs``).

- ``POST /v1/jobs``: JSON ``{"slides": ["/data/a.svs", ...]}`` (paths under a ``--slides-root``; any other
  path is 403, whatever ``..`` or links it holds, as the check is on the resolved path; or DICOMweb series
  ``{"slide_id", "dicomweb_url", "study_uid", "series_uid"}`` on a ``--dicomweb-root``, else 403) or a multipart
  upload of slide files (field ``slides``), streamed to ``OUT/service/uploads/<id>/``; a body over
  ``--max-upload-mb`` is 413, a full queue 429. Answers ``{"id": ...}``.
- ``GET /v1/jobs/{id}``: the job, its slides' status, stage, prediction (``wsi-mil predict``'s row) and
  heatmap URL; ``GET /v1/jobs``: every job; ``DELETE /v1/jobs/{id}``: cancel it.
- ``GET /v1/jobs/{id}/events``: server-sent events, one ``data:`` line with the job each time it changes,
  until it ends.

Access: loopback by default. Bound to any other address, or with ``WSI_MIL_TOKEN`` set, every request
needs ``Authorization: Bearer <token>`` (or ``?token=``), else 401; and, as in the viewer, a ``Host``
header that names neither loopback, the bound address nor an ``--allow-host`` is 403. No request value is
ever joined into a path unchecked: slide paths are resolved and must lie under a root, upload names are
reduced to a checked base name, job ids must be 32 hex digits and slide ids are looked up in the job.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import shutil
import uuid
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from ..errors import SlideError, one_line
from ..layout import Layout, is_data_name
from ..slide.dicomweb import from_csv_row
from ..viewer.app import HostGate
from .jobs import JobStore, QueueFull, remove_uploads

JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class DicomwebSlide(BaseModel):
    """A DICOMweb series, as a slide CSV row names one (:mod:`wsi_mil.slide.dicomweb`)."""

    slide_id: str
    dicomweb_url: str
    study_uid: str
    series_uid: str


class Submission(BaseModel):
    slides: list[str | DicomwebSlide] = Field(min_length=1, max_length=1000)


class TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is 413, by its Content-Length before anything is
    read, or, for a chunked body, as soon as the bytes read pass the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _too_large(send, self.limit)
        seen, started = 0, False

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise TooLarge
            return message

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except TooLarge:
            if not started:
                await _too_large(send, self.limit)


async def _too_large(send, limit: int) -> None:
    body = json.dumps({"detail": f"request body over the limit of {limit} bytes (--max-upload-mb)"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def create_service(store: JobStore, run: str, alive, layout: Layout, roots: list[Path], token: str | None,
                   bind: str = "127.0.0.1", allow_hosts: tuple[str, ...] = (), max_upload: int = 4 << 30,
                   extensions: tuple[str, ...] = (".svs",), dicomweb_roots: tuple[str, ...] = ()) -> FastAPI:
    """``run`` names the model's run (``heatmaps/<run>/``); ``alive()`` says whether the worker runs."""
    app = FastAPI(title="wsi-mil serve", summary="MIL predictions for whole-slide images", version="1")
    roots = [Path(r).resolve() for r in roots]
    dicomweb = {u.strip().rstrip("/") for u in dicomweb_roots}
    uploads = layout.uploads_dir

    @app.middleware("http")
    async def authorise(request: Request, call_next):
        if token is not None:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() \
                or request.query_params.get("token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"detail": "missing or wrong token"}, 401,
                                    headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    def job_or_404(job_id: str) -> dict:
        job = store.get(job_id) if JOB_ID.match(job_id) else None
        if job is None:
            raise HTTPException(404, "no such job")
        for s in job["slides"]:
            done = s["status"] == "done" and layout.heatmap_file(run, s["slide_id"], "overlay.png").is_file()
            s["heatmap"] = f"/v1/jobs/{job_id}/slides/{s['slide_id']}/heatmap" if done else None
        return job

    def checked_series(ref: DicomwebSlide) -> tuple[str, str]:
        try:
            series = from_csv_row(ref.model_dump(), "request", 1)
        except SlideError as exc:
            raise HTTPException(400, one_line(exc)) from None
        if series.url not in dicomweb:
            raise HTTPException(403, f"{series.url}: not an allowed --dicomweb-root")
        if not is_data_name(ref.slide_id):
            raise HTTPException(400, f"slide_id {ref.slide_id!r}: not a usable slide id")
        return ref.slide_id, series.locator

    def checked_paths(paths: list) -> list[tuple[str, str]]:
        out = []
        for raw in paths:
            if isinstance(raw, DicomwebSlide):
                out.append(checked_series(raw))
                continue
            path = Path(raw).expanduser().resolve()
            if not roots or not _under(path, roots):
                raise HTTPException(403, f"{raw}: not under an allowed --slides-root")
            if not path.exists():
                raise HTTPException(400, f"{raw}: no such slide")
            out.append((path.stem, str(path)))
        return out

    async def saved_uploads(request: Request) -> list[tuple[str, str]]:
        folder = uploads / uuid.uuid4().hex
        try:
            return await save_form(request, folder)
        except BaseException:  # a refused or broken upload leaves nothing behind
            shutil.rmtree(folder, ignore_errors=True)
            raise

    async def save_form(request: Request, folder: Path) -> list[tuple[str, str]]:
        out = []
        async with request.form(max_files=1000, max_fields=10) as form:
            files = [f for f in form.getlist("slides") if hasattr(f, "filename")]
            if not files:
                raise HTTPException(400, "a multipart upload needs one or more files in the field 'slides'")
            for upload in files:
                name = Path(upload.filename or "").name
                if not is_data_name(Path(name).stem) or Path(name).suffix.lower() not in extensions:
                    raise HTTPException(400, f"{name!r}: not a slide file name (extensions: {' '.join(extensions)})")
                folder.mkdir(parents=True, exist_ok=True)
                with (folder / name).open("wb") as fh:
                    shutil.copyfileobj(upload.file, fh, 1 << 20)
                out.append((Path(name).stem, str(folder / name)))
        return out

    @app.post("/v1/jobs", status_code=202)
    async def submit(request: Request) -> dict:
        """Queue a job: JSON ``{"slides": [paths]}`` or a multipart upload (field ``slides``)."""
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            slides = await saved_uploads(request)
        else:
            try:
                slides = checked_paths(Submission.model_validate(await request.json()).slides)
            except ValueError as exc:
                raise HTTPException(422, f"expected JSON {{\"slides\": [paths]}} ({str(exc).splitlines()[0]})") from None
        ids = [sid for sid, _ in slides]
        if len(set(ids)) < len(ids):
            raise HTTPException(400, "two slides in one job share a file name stem (the slide id)")
        try:
            job = store.submit(slides)
        except QueueFull as exc:
            remove_uploads([path for _, path in slides], uploads)
            raise HTTPException(429, str(exc)) from None
        return {"id": job}

    @app.get("/v1/jobs")
    def jobs() -> dict:
        return {"jobs": store.list()}

    @app.get("/v1/jobs/{job_id}")
    async def job(job_id: str) -> dict:  # polled: answered on the event loop (a short SQLite read), no thread hop
        return job_or_404(job_id)

    @app.delete("/v1/jobs/{job_id}")
    def cancel(job_id: str) -> dict:
        if not JOB_ID.match(job_id) or not store.cancel(job_id):
            raise HTTPException(404, "no such job")
        status = store.get(job_id)["status"]
        if status == "cancelled":  # cancelled while queued: no worker will reach it (a running job's worker cleans)
            remove_uploads(store.paths(job_id), uploads)
        return {"id": job_id, "status": status}

    @app.get("/v1/jobs/{job_id}/slides/{slide_id}/heatmap")
    def slide_heatmap(job_id: str, slide_id: str):
        for s in job_or_404(job_id)["slides"]:
            if s["slide_id"] == slide_id and s["heatmap"]:
                return FileResponse(layout.heatmap_file(run, s["slide_id"], "overlay.png"))
        raise HTTPException(404, "no heatmap for that slide in this job")

    @app.get("/v1/jobs/{job_id}/events")
    async def events(job_id: str):
        first = job_or_404(job_id)

        async def stream():
            last = None
            current = first
            while True:
                text = json.dumps(current)
                if text != last:
                    yield f"data: {text}\n\n"
                    last = text
                if current["status"] not in ("queued", "running"):
                    return
                await asyncio.sleep(0.5)
                current = await asyncio.to_thread(job_or_404, job_id)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/v1/health")
    def health() -> dict:
        return {"status": "ok", "model": run, "worker_alive": alive()}

    app.add_middleware(BodyLimit, limit=max_upload)
    app.add_middleware(HostGate, bind=bind, allowed=tuple(allow_hosts))
    return app
