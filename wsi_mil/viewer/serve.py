"""Start the viewer: check the front-end files, read the study, pick the token, run uvicorn."""

from __future__ import annotations

import errno
import secrets
import socket
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


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), or one line saying why not (bad port, port in use, bad host).
    Port 0 takes any free port (tests)."""
    if not 0 <= port < 65536:
        raise WsiMilError(f"--port {port}: must be between 0 and 65535")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise WsiMilError(f"--host {host}: cannot be resolved ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise WsiMilError(f"--port {port}: already in use on {host} (another server?); choose another "
                              f"--port") from None
        raise WsiMilError(f"--host {host} --port {port}: cannot listen ({exc.strerror or exc})") from None
    return sock


def serve(out: Path, slides: Path | None = None, run: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          open_browser: bool = False, allow_hosts: tuple[str, ...] = ()) -> None:
    missing = assets_missing()
    if missing:
        raise WsiMilError(missing)
    sock = bind_socket(host, port)  # before any URL is printed: a busy port is never shown as ours
    port = sock.getsockname()[1]
    study = Study(out, slides, run)
    token = token_for(host)
    app = create_app(study, token, bind=host, allow_hosts=tuple(allow_hosts))
    url = view_url(host, port, token)
    print(f"wsi-mil view: {len(study.slides)} slides of {out} (run {study.run}) at {url}", flush=True)
    if token:
        print("  bound beyond this machine: requests without the token get 403", flush=True)
    if open_browser:
        webbrowser.open(url.replace("0.0.0.0", "127.0.0.1"))
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
