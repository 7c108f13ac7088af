"""``wsi-mil serve``: a prediction service (FastAPI) a hospital system calls; jobs run through the same
stages as ``wsi-mil run`` into the study layout, from a queue that survives restarts."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from ..config import Config
from ..errors import WsiMilError
from ..layout import Layout
from ..mil.ensemble import resolve_model
from ..viewer.serve import LOOPBACK, bind_socket
from .app import create_service
from .jobs import JobStore
from .worker import Worker, work

__all__ = ["create_service", "serve", "JobStore", "Worker"]


def serve(layout: Layout, cfg: Config, model: Path | None, host: str = "127.0.0.1", port: int = 8010,
          roots: tuple[Path, ...] = (), max_queue: int = 16, max_upload_mb: float = 4096,
          allow_hosts: tuple[str, ...] = (), dicomweb_roots: tuple[str, ...] = ()) -> None:
    """Resolve and load the model, recover the queue, start the worker and answer HTTP until stopped."""
    for root in roots:
        if not Path(root).is_dir():
            raise WsiMilError(f"--slides-root {root}: not a folder")
    ref = resolve_model(layout, Path(model) if model else cfg.train.run_name)
    sock = bind_socket(host, port)  # before anything is printed: a busy port is one line
    token = os.environ.get("WSI_MIL_TOKEN") or (None if host in LOOPBACK else _new_token())
    db = layout.service_queue
    store = JobStore(db, max_queue)
    requeued = store.recover()
    worker = multiprocessing.get_context("spawn").Process(target=work, args=(db, layout.root, cfg, ref, os.getpid()),
                                                          name="wsi-mil-serve-worker", daemon=True)
    worker.start()
    app = create_service(store, ref.name, worker.is_alive, layout, list(roots), token, host, allow_hosts,
                         int(max_upload_mb * 2**20), tuple(cfg.slides.extensions), dicomweb_roots)
    shown = f"[{host}]" if ":" in host else host
    print(f"wsi-mil serve: model {ref.name} at http://{shown}:{sock.getsockname()[1]}/ (API docs at /docs); "
          f"{requeued} job(s) resumed", flush=True)
    if token and not os.environ.get("WSI_MIL_TOKEN"):
        print(f"  bound beyond this machine: send 'Authorization: Bearer {token}'", flush=True)
    import uvicorn

    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        worker.terminate()
        worker.join(10)


def _new_token() -> str:
    import secrets

    return secrets.token_urlsafe(24)
