"""The page a person sees: ``GET /`` (the upload form and the 3D viewer) and ``GET /static/...`` (its script,
styles and the bundled three.js), all served from the package folder ``facerecon/api/static`` -- no CDN, so the
page works on a host with no internet. The API documentation too: ``GET /docs`` (Swagger UI), ``GET /redoc``
(ReDoc) and ``GET /openapi.json``; their scripts, styles and icon are npm's ``swagger-ui-dist`` and ``redoc``,
copied into ``static/docs`` by the same build (FastAPI's defaults load them from a CDN: a blank page offline).

The folder is built from ``web/`` by ``make install`` (``npm ci && npm run build``: an esbuild bundle). Without
it ``GET /`` (and ``/docs``, ``/redoc``) answer 404 with a short page saying how to build it; the API itself, and
``/openapi.json``, need none of it.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response

__all__ = ["DOCS_ASSETS", "STATIC_DIR", "docs_router", "page_built", "page_router"]

STATIC_DIR = Path(__file__).resolve().parent / "static"

_NOT_BUILT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>facerecon</title></head>
<body><h1>facerecon</h1>
<p>The web page (and the API documentation pages' scripts) are not built. Run <code>make install</code> (or
<code>cd web &amp;&amp; npm ci &amp;&amp; npm run build</code>) and restart the server. The API is served as usual:
its description is <a href="/openapi.json">/openapi.json</a>.</p>
</body></html>
"""

_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".html": "text/html",
          ".map": "application/json", ".svg": "image/svg+xml", ".png": "image/png"}


#: Longest static path looked up (the built files' names are short); longer ones are 404 without a file-system call.
MAX_STATIC_PATH = 255


def _static_file(root: Path, path: str) -> Path | None:
    """The file ``path`` names under ``root``, or None: outside it, not a file, or a name the file system cannot
    take (a NUL byte, a name too long) -- a 404, never an ``OSError`` (500)."""
    if not path or len(path) > MAX_STATIC_PATH or "\x00" in path:
        return None
    try:
        target = (root / path).resolve()
        return target if target.is_relative_to(root) and target.is_file() else None
    except (OSError, ValueError):
        return None


#: The documentation pages' files under ``static/docs`` (web/build.mjs copies them from node_modules).
DOCS_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png", "redoc.standalone.js")


def docs_router(static_dir: Path = STATIC_DIR, title: str = "facerecon") -> APIRouter:
    """``/openapi.json``, ``/docs`` (and its OAuth2 redirect) and ``/redoc``, with every asset served from
    ``static_dir/docs`` (routes of their own, so the metrics label them by path, not as ``unmatched``)."""
    router = APIRouter(include_in_schema=False)
    assets = static_dir.resolve() / "docs"

    def built() -> bool:
        return all((assets / name).is_file() for name in DOCS_ASSETS)

    @router.get("/openapi.json")
    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(request.app.openapi())

    @router.get("/docs")
    async def swagger_ui() -> Response:
        if not built():
            return HTMLResponse(_NOT_BUILT, status_code=404)
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title=f"{title} - Swagger UI", oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url="/static/docs/swagger-ui-bundle.js", swagger_css_url="/static/docs/swagger-ui.css",
            swagger_favicon_url="/static/docs/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None})  # no badge fetched from the public validator

    @router.get("/docs/oauth2-redirect")
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @router.get("/redoc")
    async def redoc() -> Response:
        if not built():
            return HTMLResponse(_NOT_BUILT, status_code=404)
        return get_redoc_html(openapi_url="/openapi.json", title=f"{title} - ReDoc",
                              redoc_js_url="/static/docs/redoc.standalone.js",
                              redoc_favicon_url="/static/docs/favicon-32x32.png", with_google_fonts=False)

    return router


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
        target = _static_file(root, path)
        if target is None:
            shown = path if len(path) <= 80 else path[:77] + "..."
            raise HTTPException(404, f"no static file {shown!r}")
        media = _TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        return FileResponse(target, media_type=media, headers={"Cache-Control": "no-cache"})

    return router
