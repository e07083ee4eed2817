"""The HTTP service: a FastAPI app over :class:`facerecon.pipeline.Reconstructor`.

* :func:`facerecon.api.app.create_app`: the app factory (lifespan start-up, routes, error mapping, metrics).
* :func:`facerecon.api.server.serve`: run it under uvicorn with graceful shutdown (``facerecon serve``).

Imports are lazy so that ``facerecon --help`` does not pay for FastAPI and uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from facerecon.api.app import create_app
    from facerecon.api.server import serve

__all__ = ["create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from facerecon.api.app import create_app

        return create_app
    if name == "serve":
        from facerecon.api.server import serve

        return serve
    raise AttributeError(f"module 'facerecon.api' has no attribute {name!r}")
