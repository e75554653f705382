"""The gateway's front door, an ASGI middleware in front of every route: the API key
(401), the key's rate limits (429), the body size while it is read (413), JSON nesting and
field limits (400) and the models the key may use (403).

Refusals are typed errors mapped to the OpenAI shape here, at the edge. `/health` stays
open. A browser reaches the console with the key in a cookie that `/console/login` sets
(an EventSource cannot send headers); the cookie counts for GET requests only, so another
site cannot make a browser spend the key on a POST."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from meshllm.common.errors import MeshError
from meshllm.gateway.auth import ApiKey, InvalidApiKey, KeyRing, ModelNotAllowed
from meshllm.gateway.errors import api_error_for
from meshllm.gateway.key_limits import CURRENT_METER, KeyLimiter, TokenMeter
from meshllm.gateway.limits import (
    InputLimits,
    check_content_length,
    check_request,
    parse_body,
    read_body,
)
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health"})
COOKIE = "meshllm_key"
LOGIN_PATH = "/console/login"


@dataclass
class Gate:
    """Everything the front door decides with; `clock` is injectable for tests."""

    keys: KeyRing
    limits: InputLimits
    limiter: KeyLimiter = field(default_factory=KeyLimiter)
    clock: Callable[[], float] = time.monotonic

    def key_for(self, scope: Scope) -> ApiKey | None:
        """The caller's key (None: keys are off or the path is open); InvalidApiKey."""
        if not self.keys.enabled or scope["path"] in OPEN_PATHS:
            return None
        headers = _headers(scope)
        authorization = headers.get("authorization", "")
        if not authorization and scope["method"] in ("GET", "HEAD"):
            cookie = _cookie(headers.get("cookie", ""), COOKIE)
            authorization = f"Bearer {cookie}" if cookie else ""
        return self.keys.authenticate(authorization)

    async def admit(self, scope: Scope, receive: Receive) -> tuple[ApiKey | None, Receive]:
        """Check the request; the key and the `receive` the app reads the body from."""
        key = self.key_for(scope)
        if key is not None:
            self.limiter.admit(key, self.clock())
        try:
            return key, await self._read(scope, receive, key)
        except BaseException:
            if key is not None:
                self.limiter.release(key)
            raise

    async def _read(self, scope: Scope, receive: Receive, key: ApiKey | None) -> Receive:
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return receive
        check_content_length(_headers(scope), self.limits)
        body = await read_body(receive, self.limits)
        data = parse_body(body, self.limits)
        if isinstance(data, dict) and scope["path"].startswith("/v1/"):
            check_request(data, self.limits)
            model = data.get("model")
            if key is not None and isinstance(model, str) and not key.may_use(model):
                raise ModelNotAllowed(key.name, model)
        return _replay(body, receive)


def gate_middleware(gate: Gate) -> Callable[[ASGIApp], ASGIApp]:
    def wrap(app: ASGIApp) -> ASGIApp:
        async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            try:
                key, replay = await gate.admit(scope, receive)
            except MeshError as exc:
                await _refusal(scope, exc)(scope, receive, send)
                return
            if key is None:
                await app(scope, replay, send)
                return
            meter = TokenMeter()
            token = CURRENT_METER.set(meter)
            try:
                await app(scope, replay, send)
            finally:
                CURRENT_METER.reset(token)
                gate.limiter.release(key)
                gate.limiter.charge(key, meter.tokens, gate.clock())
        return asgi
    return wrap


def front_door(app: ASGIApp, gate: Gate, cors_origins: tuple[str, ...]) -> ASGIApp:
    """The app behind the gate, and behind CORS when origins are configured (outermost, so
    that a browser's preflight is answered without a key, as the standard requires)."""
    gated = gate_middleware(gate)(app)
    if not cors_origins:
        return gated
    cors: ASGIApp = CORSMiddleware(gated, allow_origins=cors_origins,
                                   allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                                   allow_headers=["Authorization", "Content-Type"])
    return cors


def _refusal(scope: Scope, error: MeshError) -> Response:
    if isinstance(error, InvalidApiKey) and scope["method"] == "GET" and (
            scope["path"] == "/console" or scope["path"].startswith("/console/")):
        return HTMLResponse(LOGIN_PAGE, status_code=401)
    return api_error_for(error).response()


def _headers(scope: Scope) -> Mapping[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope.get("headers", [])}


def _cookie(header: str, name: str) -> str:
    """One cookie's value. Not SimpleCookie: one odd cookie of another app on the same host
    (cookies ignore ports) makes it drop every cookie after it."""
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"')
    return ""


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the body already read, then the server's own (which
    reports the client going away: a stream must still notice that)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


async def login(request: Request) -> Response:
    """Reached only with a valid key (the gate checked it): keep it in a cookie so that the
    console's page, script and event streams carry it."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    response = JSONResponse({"status": "ok"})
    if scheme.lower() == "bearer" and key:
        response.set_cookie(COOKIE, key.strip(), httponly=True, samesite="strict", path="/")
    return response


def gate_routes() -> list[BaseRoute]:
    return [Route(LOGIN_PATH, login, methods=["POST"])]


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mesh-llm console: API key</title></head>
<body style="font-family: sans-serif; max-width: 32em; margin: 4em auto">
<h1>mesh-llm</h1>
<p>This gateway needs an API key. It is kept in a cookie of this browser for this site.</p>
<form id="login"><input id="key" type="password" size="40" placeholder="API key" autofocus>
<button>Open the console</button></form><p id="error" style="color: #b00"></p>
<script>
document.getElementById("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = document.getElementById("key").value.trim();
  const response = await fetch("/console/login",
    { method: "POST", headers: { Authorization: "Bearer " + key } });
  if (response.ok) { location.reload(); return; }
  document.getElementById("error").textContent = "That key was refused.";
});
</script></body></html>
"""
