"""Start the viewer: check the front-end files, read the study, pick the token, run uvicorn."""

from __future__ import annotations

import secrets
import webbrowser
from pathlib import Path

from ..errors import WsiMilError
from .app import assets_missing, create_app
from .study import Study

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def token_for(host: str) -> str | None:
    """Like Jupyter: no token on loopback; any other bind address gets a fresh random one."""
    return None if host in LOOPBACK else secrets.token_urlsafe(24)


def view_url(host: str, port: int, token: str | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def serve(out: Path, slides: Path | None = None, run: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          open_browser: bool = False) -> None:
    missing = assets_missing()
    if missing:
        raise WsiMilError(missing)
    study = Study(out, slides, run)
    token = token_for(host)
    app = create_app(study, token)
    url = view_url(host, port, token)
    print(f"wsi-mil view: {len(study.slides)} slides of {out} (run {study.run}) at {url}", flush=True)
    if token:
        print("  bound beyond this machine: requests without the token get 403", flush=True)
    if open_browser:
        webbrowser.open(url.replace("0.0.0.0", "127.0.0.1"))
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")
