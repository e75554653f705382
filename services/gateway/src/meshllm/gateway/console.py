"""The web console: one page with its script and style, served by the gateway itself so
that it works without internet access (no CDN), fed by the status stream."""

from __future__ import annotations

from importlib import resources

from meshllm.gateway.status_stream import StatusStream
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

ASSETS = {"console.html": "text/html; charset=utf-8",
          "console.js": "text/javascript; charset=utf-8",
          "console.css": "text/css; charset=utf-8"}


def load_assets() -> dict[str, bytes]:
    """The console's files from the package (read once, when the routes are built)."""
    folder = resources.files("meshllm.gateway") / "static"
    return {name: (folder / name).read_bytes() for name in ASSETS}


def console_routes(stream: StatusStream) -> list[BaseRoute]:
    assets = load_assets()

    def serve(name: str) -> Response:
        return Response(assets[name], media_type=ASSETS[name],
                        headers={"Cache-Control": "no-cache"})

    async def page(request: Request) -> Response:
        return serve("console.html")

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            return Response("not found", status_code=404, media_type="text/plain")
        return serve(name)

    async def to_console(request: Request) -> Response:
        return RedirectResponse("/console")

    return [
        Route("/console", page, methods=["GET"]),
        Route("/console/", to_console, methods=["GET"]),
        Route("/console/{name}", asset, methods=["GET"]),
        Route("/api/status/stream", stream.endpoint, methods=["GET"]),
    ]
