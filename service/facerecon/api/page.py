"""The page a person sees: ``GET /`` (the upload form and the 3D viewer) and ``GET /static/...`` (its script,
styles and the bundled three.js), all served from the package folder ``facerecon/api/static`` -- no CDN, so the
page works on a host with no internet.

The folder is built from ``web/`` by ``make install`` (``npm ci && npm run build``: an esbuild bundle). Without
it ``GET /`` answers 404 with a short page saying how to build it; the API itself needs none of it.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, HTMLResponse, Response

__all__ = ["STATIC_DIR", "page_built", "page_router"]

STATIC_DIR = Path(__file__).resolve().parent / "static"

_NOT_BUILT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>facerecon</title></head>
<body><h1>facerecon</h1>
<p>The web page is not built. Run <code>make install</code> (or <code>cd web &amp;&amp; npm ci &amp;&amp;
npm run build</code>) and restart the server. The API is served as usual: see <a href="/docs">/docs</a>.</p>
</body></html>
"""

_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".html": "text/html",
          ".map": "application/json", ".svg": "image/svg+xml", ".png": "image/png"}


def page_built(static_dir: Path = STATIC_DIR) -> bool:
    """Whether the built page is there (``index.html`` and its bundle)."""
    return (static_dir / "index.html").is_file() and (static_dir / "app.js").is_file()


def page_router(static_dir: Path = STATIC_DIR) -> APIRouter:
    """``GET /`` and ``GET /static/{path}`` from ``static_dir`` (files only, no listing, nothing outside it)."""
    router = APIRouter(include_in_schema=False)
    root = static_dir.resolve()

    @router.get("/")
    async def index() -> Response:
        page = root / "index.html"
        if not page.is_file():
            return HTMLResponse(_NOT_BUILT, status_code=404)
        return FileResponse(page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    @router.get("/static/{path:path}")
    async def static(path: str) -> Response:
        target = (root / path).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            raise HTTPException(404, f"no static file {path!r}")
        media = _TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        return FileResponse(target, media_type=media, headers={"Cache-Control": "no-cache"})

    return router
