"""The viewer's web app (Starlette): two static pages, a JSON API and tiles, all read-only.

Routes take a slide id and look it up in the study's own list (unknown: 404); no request value is ever
joined into a path. When a token is set (any bind address but loopback), every request must carry it as
``?token=``, the cookie the first such request sets, or an ``Authorization: token ...`` header; others get 403.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import WsiMilError, one_line
from .study import Study
from .tiles import CMAPS, TILE, SlideView, lut

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


class Views:
    """One open :class:`SlideView` per slide, the least recently used closed beyond ``limit``."""

    def __init__(self, study: Study, limit: int = 8):
        self.study, self.limit = study, limit
        self._views: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            while self._views:
                self._views.popitem()[1].close()

    def get(self, slide_id: str) -> SlideView | None:
        entry = self.study.slides.get(slide_id)
        if entry is None or entry.path is None:
            return None
        with self._lock:
            view = self._views.get(slide_id)
            if view is None:
                view = SlideView(entry.path, self.study.patches_file(slide_id),
                                 self.study.heatmap_file(slide_id, "scores.h5"))
                self._views[slide_id] = view
                while len(self._views) > self.limit:
                    self._views.popitem(last=False)[1].close()
            self._views.move_to_end(slide_id)
            return view


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


def _image(data: bytes | None, media: str) -> Response:
    if data is None:
        return PlainTextResponse("not found", 404)
    return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=300"})


def _slide_meta(study: Study, view: SlideView, slide_id: str) -> dict:
    entry = study.slides[slide_id]
    s = view.scores
    maps = list(s.get("maps", {}))
    summary = study.heatmap_summary(slide_id) or {}
    return {
        **entry.to_json(), "run": study.run, "width": view.width, "height": view.height, "mpp": view.mpp,
        "tile_size": TILE, "levels": view.dz.level_count, "maps": maps,
        "default_map": s.get("mapped_class") if s.get("mapped_class") in maps else (maps[0] if maps else None),
        "classes": s.get("classes", []), "top_k": int((summary.get("heatmap") or {}).get("top_k", 8) or 8),
        "has_tissue": view.tissue_mask is not None,
        "downloads": {k: f"/download/{slide_id}/{k}" for k, name in DOWNLOADS.items()
                      if study.heatmap_file(slide_id, name) is not None},
    }


def create_app(study: Study, token: str | None = None, cache_bytes: int = 256 << 20) -> Starlette:
    views, cache = Views(study), ByteCache(cache_bytes)

    def view_or_404(request: Request) -> tuple[str, SlideView | None]:
        slide_id = request.path_params["slide_id"]
        return slide_id, views.get(slide_id)

    def page(name: str):
        def endpoint(request: Request) -> Response:
            if name == "slide.html" and request.path_params["slide_id"] not in study.slides:
                return PlainTextResponse("no such slide in this study", 404)
            return FileResponse(STATIC / name, headers=HEADERS)
        return endpoint

    def api_study(request: Request) -> Response:
        if study.refresh():  # a stage ran meanwhile: reopen slides and drop tiles rendered from old scores
            views.clear()
            cache.clear()
        return JSONResponse({"out": study.layout.root.name, "run": study.run,
                             "slides": [e.to_json() for e in study.slides.values()]})

    def api_slide(request: Request) -> Response:
        slide_id, view = view_or_404(request)
        if view is None:
            return JSONResponse({"error": "no such slide, or its slide file was not found"}, 404)
        return JSONResponse(_slide_meta(study, view, slide_id))

    def api_patches(request: Request) -> Response:
        slide_id, view = view_or_404(request)
        if view is None or not view.scores:
            return JSONResponse({"error": "no heatmap for this slide"}, 404)
        s = view.scores
        return JSONResponse({
            "size": s["size0"], "x": s["coords"][:, 0].tolist(), "y": s["coords"][:, 1].tolist(),
            "percentile": {k: np.round(v, 2).tolist() for k, v in s["maps"].items()},
            "logit": {k: np.round(v, 4).tolist() for k, v in s["logits"].items()},
        })

    def api_colormaps(request: Request) -> Response:
        stops = np.linspace(0, 255, 17).astype(int)
        return JSONResponse({c: ["#" + bytes(lut(c)[i, :3]).hex() for i in stops] for c in CMAPS})

    def tiles(kind: str, media: str, params: tuple[str, ...] = (), valid=lambda view, p: True):
        """An endpoint for one kind of Deep Zoom tile, rendered by ``SlideView.<kind>_tile`` and cached."""
        def endpoint(request: Request) -> Response:
            slide_id, view = view_or_404(request)
            p = request.path_params
            if view is None or not valid(view, p):
                return PlainTextResponse("not found", 404)
            args = (*(p[k] for k in params), p["level"], p["col"], p["row"])
            render = getattr(view, f"{kind}_tile")
            return _image(cache.get((slide_id, kind, *args), lambda: render(*args)), media)
        return endpoint

    def thumb(request: Request) -> Response:
        slide_id, view = view_or_404(request)
        if view is None:
            return PlainTextResponse("not found", 404)
        return _image(cache.get((slide_id, "t"), view.thumbnail), "image/jpeg")

    def patch(request: Request) -> Response:
        slide_id, view = view_or_404(request)
        i = request.path_params["index"]
        if view is None or not view.scores or not 0 <= i < len(view.scores["coords"]):
            return PlainTextResponse("not found", 404)
        s = view.scores
        x, y = (int(v) for v in s["coords"][i])
        return _image(cache.get((slide_id, "p", i), lambda: view.patch_image(x, y, s["patch_level"],
                                                                           s["patch_size_level"])), "image/jpeg")

    def download(request: Request) -> Response:
        slide_id, kind = request.path_params["slide_id"], request.path_params["kind"]
        if slide_id not in study.slides or kind not in DOWNLOADS:
            return PlainTextResponse("not found", 404)
        path = study.heatmap_file(slide_id, DOWNLOADS[kind])
        if path is None:
            return PlainTextResponse("not found", 404)
        return FileResponse(path, filename=f"{slide_id}.{DOWNLOADS[kind]}")

    routes = [
        Route("/", page("study.html")),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Route("/slides/{slide_id}", page("slide.html")),
        Route("/api/study", api_study),
        Route("/api/colormaps", api_colormaps),
        Route("/api/slides/{slide_id}", api_slide),
        Route("/api/slides/{slide_id}/patches", api_patches),
        Route("/tiles/{slide_id}/slide/{level:int}/{col:int}_{row:int}.jpeg", tiles("slide", "image/jpeg")),
        Route("/tiles/{slide_id}/overlay/{map}/{cmap}/{level:int}/{col:int}_{row:int}.png",
              tiles("overlay", "image/png", ("map", "cmap"),
                    lambda view, p: p["cmap"] in CMAPS and p["map"] in view.scores.get("maps", {}))),
        Route("/tiles/{slide_id}/contour/{level:int}/{col:int}_{row:int}.png", tiles("contour", "image/png")),
        Route("/thumbs/{slide_id}.jpeg", thumb),
        Route("/patches/{slide_id}/{index:int}.jpeg", patch),
        Route("/download/{slide_id}/{kind}", download),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    async def errors(request: Request, exc: Exception) -> Response:
        return PlainTextResponse(f"error: {one_line(exc)}", 422 if isinstance(exc, WsiMilError) else 500)

    app = Starlette(routes=routes, exception_handlers={Exception: errors, WsiMilError: errors})
    app.add_middleware(TokenGate, token=token)
    return app
