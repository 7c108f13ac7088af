"""The viewer's web app (Starlette): two static pages, a JSON API and tiles, all read-only.

Routes take a slide id and look it up in the study's own list (unknown: 404); no request value is ever
joined into a path. When a token is set (any bind address but loopback), every request must carry it as
``?token=``, the cookie the first such request sets, or an ``Authorization: token ...`` header; others get 403.
Like Jupyter, a request whose ``Host`` is not a loopback name, the bound address or a name the user allows
(``--allow-host``) gets 403, so a page on another site cannot reach the viewer through DNS rebinding.

Slide handles are reference-counted (:class:`Views`): a handle evicted from the cache, or dropped by a
study refresh, is closed only once the last request using it has finished.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from urllib.parse import quote

import numpy as np
from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import WsiMilError, one_line
from ..slide.dicomweb import slide_exists
from .study import Study
from .tiles import CMAPS, TILE, SlideView, lut

log = logging.getLogger(__name__)
COOKIE = "wsi_mil_token"
STATIC = Path(str(resources.files("wsi_mil.viewer") / "static"))
OSD_ASSET = STATIC / "vendor" / "openseadragon" / "openseadragon.min.js"
DOWNLOADS = {"geojson": "patches.geojson", "tiff": "heatmap.tiff", "summary": "summary.json", "overlay": "overlay.png"}
HEADERS = {  # nothing inline runs, even if a name slipped through unescaped
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
}


def assets_missing() -> str | None:
    """One line saying how to get OpenSeadragon, or None when it is installed."""
    if OSD_ASSET.is_file():
        return None
    return ("the viewer's OpenSeadragon files are missing: install Node.js and npm (e.g. apt-get install -y npm), "
            "then run `make viewer-assets` in the wsi_mil checkout")


class ByteCache:
    """A thread-safe LRU of encoded tiles, bounded in bytes."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes, self.size = max_bytes, 0
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.size = 0

    def get(self, key, make: Callable[[], bytes | None]) -> bytes | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        if value is not None:
            with self._lock:
                if key not in self._items:
                    self._items[key] = value
                    self.size += len(value)
                while self.size > self.max_bytes and self._items:
                    self.size -= len(self._items.popitem(last=False)[1])
        return value


class _Handle:
    def __init__(self, view: SlideView):
        self.view, self.users, self.retired = view, 0, False


class Views:
    """Open :class:`SlideView` s, at most ``limit`` cached (least recently used out), reference-counted.

    :meth:`use` lends a view for one request. A view leaves the cache when it is the least recently used
    beyond ``limit``, on :meth:`clear` (a study refresh) or when its slide file is gone; it is closed when
    the last request using it returns, never while one still reads from it.
    """

    def __init__(self, study: Study, limit: int = 8):
        self.study, self.limit = study, limit
        self._handles: OrderedDict[str, _Handle] = OrderedDict()
        self._lock = threading.Lock()

    def _retire(self, handle: _Handle) -> None:  # under self._lock
        handle.retired = True
        if handle.users == 0:
            handle.view.close()

    def clear(self) -> None:
        with self._lock:
            while self._handles:
                self._retire(self._handles.popitem()[1])

    def _acquire(self, slide_id: str) -> _Handle | None:
        entry = self.study.slides.get(slide_id)
        path = None if entry is None else entry.path
        with self._lock:
            handle = self._handles.get(slide_id)
            if path is None or not slide_exists(path):  # unknown, or deleted since the study was read
                if handle is not None:
                    self._retire(self._handles.pop(slide_id))
                return None
            if handle is None:
                handle = _Handle(SlideView(path, self.study.patches_file(slide_id),
                                           self.study.heatmap_file(slide_id, "scores.h5")))
                self._handles[slide_id] = handle
                while len(self._handles) > self.limit:
                    self._retire(self._handles.popitem(last=False)[1])
            self._handles.move_to_end(slide_id)
            handle.users += 1
            return handle

    @contextmanager
    def use(self, slide_id: str) -> Iterator[SlideView | None]:
        handle = self._acquire(slide_id)
        try:
            yield None if handle is None else handle.view
        finally:
            if handle is not None:
                with self._lock:
                    handle.users -= 1
                    if handle.retired and handle.users == 0:
                        handle.view.close()


class TokenGate:
    """ASGI middleware: 403 unless the request carries the token (query, cookie or header)."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.token is None:
            return await self.app(scope, receive, send)
        request = Request(scope)
        auth = request.headers.get("authorization", "")
        query = request.query_params.get("token")
        given = query or request.cookies.get(COOKIE) or (auth[6:] if auth.lower().startswith("token ") else "")
        if not secrets.compare_digest(given.encode(), self.token.encode()):
            return await PlainTextResponse("403: this viewer needs its token (see the URL it printed)", 403)(
                scope, receive, send)
        if query is None:
            return await self.app(scope, receive, send)

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict".encode()
                message["headers"] = [*message.get("headers", []), (b"set-cookie", cookie)]
            await send(message)

        return await self.app(scope, receive, send_with_cookie)


LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def _host_name(header: str) -> str:
    """The host of a ``Host`` header, without port or IPv6 brackets, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _ip(name: str):
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


class HostGate:
    """ASGI middleware: 403 unless ``Host`` names this machine's loopback, the bound address, an IP address
    while bound to every interface, or a name in ``allowed`` (``*`` allows any), as Jupyter does."""

    def __init__(self, app, bind: str = "127.0.0.1", allowed: tuple[str, ...] = ()):
        self.app, self.bind = app, _host_name(bind)
        self.allowed = {_host_name(a) for a in allowed}
        self.wildcard = self.bind in {"0.0.0.0", "::", ""}

    def ok(self, host: str) -> bool:
        if "*" in self.allowed or host in self.allowed or host == self.bind or host in LOOPBACK_NAMES:
            return True
        if host.endswith(".localhost"):
            return True
        ip = _ip(host)
        return ip is not None and (ip.is_loopback or self.wildcard)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if not self.ok(_host_name(host)):
            return await PlainTextResponse("403: unknown Host; start wsi-mil view with --allow-host NAME to "
                                           "allow it", 403)(scope, receive, send)
        return await self.app(scope, receive, send)


class SecurityHeaders:
    """ASGI middleware: every response carries :data:`HEADERS` (nosniff, CSP, no referrer), the router's own
    404s and error pages included; headers a response already set are kept."""

    def __init__(self, app):
        self.app = app
        self.extra = [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *(h for h in self.extra if h[0] not in have)]
            await send(message)

        return await self.app(scope, receive, send_with_headers)


class IndexConvertor(Convertor):
    """Path integers of at most 9 digits (a tile index of 5,000 digits is a 404, not int()'s ValueError)."""

    regex = "[0-9]{1,9}"

    def convert(self, value: str) -> int:
        return int(value)

    def to_string(self, value: int) -> str:
        return str(int(value))


register_url_convertor("idx", IndexConvertor())


def _image(data: bytes | None, media: str) -> Response:
    if data is None:
        return PlainTextResponse("not found", 404)
    return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=300"})


def _slide_meta(study: Study, view: SlideView, slide_id: str) -> dict:
    entry = study.slides[slide_id]
    s = view.scores
    maps = list(view.maps)
    mapped = s.mapped_class if s is not None else None
    summary = study.heatmap_summary(slide_id) or {}
    return {
        **entry.to_json(), "run": study.run, "task": study.task, "width": view.width, "height": view.height, "mpp": view.mpp,
        "tile_size": TILE, "levels": view.dz.level_count, "maps": maps,
        "default_map": mapped if mapped in maps else (maps[0] if maps else None),
        "classes": s.classes if s is not None else [],
        "top_k": int((summary.get("heatmap") or {}).get("top_k", 8) or 8),
        "has_tissue": view.tissue_mask is not None,
        "downloads": {k: f"/download/{quote(slide_id, safe='')}/{k}" for k, name in DOWNLOADS.items()
                      if study.heatmap_file(slide_id, name) is not None},
    }


def _json(data, status: int = 200) -> Response:
    return JSONResponse(data, status)


def _text(text: str, status: int) -> Response:
    return PlainTextResponse(text, status)


def create_app(study: Study, token: str | None = None, cache_bytes: int = 256 << 20, bind: str = "127.0.0.1",
               allow_hosts: tuple[str, ...] = (), view_limit: int = 8) -> Starlette:
    views, cache = Views(study, view_limit), ByteCache(cache_bytes)

    def page(name: str):
        def endpoint(request: Request) -> Response:
            if name == "slide.html" and request.path_params["slide_id"] not in study.slides:
                return _text("no such slide in this study", 404)
            return FileResponse(STATIC / name)
        return endpoint

    def api_study(request: Request) -> Response:
        if study.refresh():  # a stage ran meanwhile: reopen slides and drop tiles rendered from old scores
            views.clear()
            cache.clear()
        return _json({"out": study.layout.root.name, "run": study.run, "task": study.task,
                      "columns": study.columns, "slides": [e.to_json() for e in study.slides.values()]})

    def api_slide(request: Request) -> Response:
        slide_id = request.path_params["slide_id"]
        with views.use(slide_id) as view:
            if view is None:
                return _json({"error": "no such slide, or its slide file was not found"}, 404)
            return _json(_slide_meta(study, view, slide_id))

    def api_patches(request: Request) -> Response:
        with views.use(request.path_params["slide_id"]) as view:
            if view is None or view.scores is None:
                return _json({"error": "no heatmap for this slide"}, 404)
            s = view.scores
            return _json({
                "size": float(s.spec.patch_size_level0), "x": s.coords[:, 0].tolist(), "y": s.coords[:, 1].tolist(),
                "percentile": {k: np.round(v[0], 2).tolist() for k, v in view.maps.items()},
                "logit": {k: np.round(v[1], 4).tolist() for k, v in view.maps.items()},
            })

    def api_colormaps(request: Request) -> Response:
        stops = np.linspace(0, 255, 17).astype(int)
        return _json({c: ["#" + bytes(lut(c)[i, :3]).hex() for i in stops] for c in CMAPS})

    def tiles(kind: str, media: str, params: tuple[str, ...] = (), valid=lambda view, p: True):
        """An endpoint for one kind of Deep Zoom tile, rendered by ``SlideView.<kind>_tile`` and cached."""
        def endpoint(request: Request) -> Response:
            slide_id, p = request.path_params["slide_id"], request.path_params
            with views.use(slide_id) as view:
                if view is None or not valid(view, p):
                    return _text("not found", 404)
                args = (*(p[k] for k in params), p["level"], p["col"], p["row"])
                render = getattr(view, f"{kind}_tile")
                return _image(cache.get((slide_id, kind, *args), lambda: render(*args)), media)
        return endpoint

    def thumb(request: Request) -> Response:
        slide_id = request.path_params["slide_id"]
        with views.use(slide_id) as view:
            if view is None:
                return _text("not found", 404)
            return _image(cache.get((slide_id, "t"), view.thumbnail), "image/jpeg")

    def patch(request: Request) -> Response:
        slide_id, i = request.path_params["slide_id"], request.path_params["index"]
        with views.use(slide_id) as view:
            if view is None or view.scores is None or not 0 <= i < len(view.scores.coords):
                return _text("not found", 404)
            s = view.scores
            x, y = (int(v) for v in s.coords[i])
            return _image(cache.get((slide_id, "p", i), lambda: view.patch_image(
                x, y, s.spec.patch_level, s.spec.patch_size_level)), "image/jpeg")

    def download(request: Request) -> Response:
        slide_id, kind = request.path_params["slide_id"], request.path_params["kind"]
        if slide_id not in study.slides or kind not in DOWNLOADS:
            return _text("not found", 404)
        path = study.heatmap_file(slide_id, DOWNLOADS[kind])
        if path is None:
            return _text("not found", 404)
        return FileResponse(path, filename=f"{slide_id}.{DOWNLOADS[kind]}")

    routes = [
        Route("/", page("study.html")),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Route("/slides/{slide_id}", page("slide.html")),
        Route("/api/study", api_study),
        Route("/api/colormaps", api_colormaps),
        Route("/api/slides/{slide_id}", api_slide),
        Route("/api/slides/{slide_id}/patches", api_patches),
        Route("/tiles/{slide_id}/slide/{level:idx}/{col:idx}_{row:idx}.jpeg", tiles("slide", "image/jpeg")),
        Route("/tiles/{slide_id}/overlay/{map}/{cmap}/{level:idx}/{col:idx}_{row:idx}.png",
              tiles("overlay", "image/png", ("map", "cmap"),
                    lambda view, p: p["cmap"] in CMAPS and p["map"] in view.maps)),
        Route("/tiles/{slide_id}/contour/{level:idx}/{col:idx}_{row:idx}.png", tiles("contour", "image/png")),
        Route("/thumbs/{slide_id}.jpeg", thumb),
        Route("/patches/{slide_id}/{index:idx}.jpeg", patch),
        Route("/download/{slide_id}/{kind}", download),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    async def errors(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, WsiMilError):
            log.warning("viewer: %s %s failed", request.method, request.url.path, exc_info=exc)
        return _text(f"error: {one_line(exc)}", 422 if isinstance(exc, WsiMilError) else 500)

    app = Starlette(routes=routes, exception_handlers={Exception: errors, WsiMilError: errors})
    app.add_middleware(TokenGate, token=token)
    app.add_middleware(HostGate, bind=bind, allowed=tuple(allow_hosts))
    app.add_middleware(SecurityHeaders)  # outermost: the gates' 403s carry the headers too
    return app
