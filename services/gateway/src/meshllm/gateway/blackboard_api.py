"""The blackboard's HTTP API on the gateway: thin handlers over `BlackboardClient`.

POST /api/blackboard/posts           {"author", "text", "tags"?, "channel"?, "reply_to"?}
GET  /api/blackboard/posts           ?since=&author=&tag=&channel=&limit=   newest first
GET  /api/blackboard/search          ?q=&limit=&mode=semantic|words|hybrid   best first;
                                     the reply's mode_used and note say how it ranked
GET  /api/blackboard/stream          ?author=&tag=&channel=     server-sent events
Errors have the OpenAI shape {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from meshllm.common.blackboard.client import BlackboardClient
from meshllm.common.blackboard.errors import BlackboardError
from meshllm.common.blackboard.types import Draft, FeedQuery, Post, PostId, SubscribeFilter
from meshllm.common.blackboard.wire import (
    parse_mode,
    parse_since,
    post_to_json,
    search_result_to_json,
)
from meshllm.common.errors import MeshError
from meshllm.gateway.errors import ApiError, api_error_for, invalid
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MAX_LIMIT = 1000
HEARTBEAT_S = 15.0  # an SSE comment this often keeps idle proxies from closing the stream


def _str_list(value: Any, param: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid(f"{param} must be a list of strings", param, "invalid_value")
    return tuple(value)


def _optional_str(body: dict[str, Any], param: str) -> str:
    value = body.get(param) or ""
    if not isinstance(value, str):
        raise invalid(f"{param} must be a string", param, "invalid_value")
    return value


def draft_from_json(body: Any) -> Draft:
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object", None, "invalid_value")
    for param in ("author", "text"):
        if not isinstance(body.get(param), str) or not body[param]:
            raise invalid(f"{param} is required and must be a non-empty string", param,
                          "invalid_value")
    reply_to = _optional_str(body, "reply_to")
    return Draft(author=body["author"], text=body["text"], tags=_str_list(body.get("tags"), "tags"),
                 channel=_optional_str(body, "channel"),
                 reply_to=PostId(reply_to) if reply_to else None)


def _limit(request: Request, default: int) -> int:
    raw = request.query_params.get("limit", "")
    if not raw:
        return default
    if not raw.isdigit() or not 0 < int(raw) <= MAX_LIMIT:
        raise invalid(f"limit must be an integer in 1..{MAX_LIMIT}", "limit", "invalid_value")
    return int(raw)


def feed_query(request: Request) -> FeedQuery:
    params = request.query_params
    try:
        since = parse_since(params.get("since", ""), time.time_ns() // 1_000_000)
    except ValueError as exc:
        raise invalid(str(exc), "since", "invalid_value") from exc
    return FeedQuery(since_unix_ms=since, author=params.get("author", ""),
                     tag=params.get("tag", ""), channel=params.get("channel", ""),
                     limit=_limit(request, 50))


def _sse(event: str, data: object) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def sse_events(posts: AsyncIterator[Post], heartbeat_s: float) -> AsyncIterator[str]:
    """Server-sent events for a stream of posts, with heartbeats while it is quiet."""
    queue: asyncio.Queue[Post | BlackboardError | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for post in posts:
                await queue.put(post)
            await queue.put(None)
        except BlackboardError as exc:
            await queue.put(exc)

    task = asyncio.create_task(pump())
    try:
        yield ": connected\n\n"
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), heartbeat_s)
            except TimeoutError:
                yield ": heartbeat\n\n"
                continue
            if item is None:
                return
            if isinstance(item, BlackboardError):
                yield _sse("error", {"error": {"message": str(item), "type": "api_error",
                                               "param": None, "code": item.reason}})
                return
            yield _sse("post", post_to_json(item))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def blackboard_routes(client: BlackboardClient) -> list[Route]:
    async def create_post(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            raise invalid("the body is not valid JSON", None, "invalid_json") from None
        accepted = await client.post(draft_from_json(body))
        return JSONResponse({**post_to_json(accepted.post),
                             "redactions": list(accepted.redactions)}, status_code=201)

    async def list_posts(request: Request) -> Response:
        posts = await client.feed(feed_query(request))
        return JSONResponse({"object": "list", "data": [post_to_json(p) for p in posts]})

    async def search(request: Request) -> Response:
        query = request.query_params.get("q", "")
        if not query.strip():
            raise invalid("q is required: the words to search for", "q", "invalid_value")
        try:
            mode = parse_mode(request.query_params.get("mode", ""))
        except ValueError as exc:
            raise invalid(str(exc), "mode", "invalid_value") from exc
        result = await client.search_result(query, _limit(request, 20), mode)
        return JSONResponse(search_result_to_json(result))

    async def stream(request: Request) -> Response:
        params = request.query_params
        wanted = SubscribeFilter(params.get("author", ""), params.get("tag", ""),
                                 params.get("channel", ""))
        return StreamingResponse(sse_events(client.subscribe(wanted), HEARTBEAT_S),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return [
        Route("/api/blackboard/posts", _edge(create_post), methods=["POST"]),
        Route("/api/blackboard/posts", _edge(list_posts), methods=["GET"]),
        Route("/api/blackboard/search", _edge(search), methods=["GET"]),
        Route("/api/blackboard/stream", _edge(stream), methods=["GET"]),
    ]


def _edge(handler: Callable[[Request], Awaitable[Response]]
          ) -> Callable[[Request], Awaitable[Response]]:
    """Errors to HTTP responses (errors.api_error_for), so that these routes answer the
    same when mounted without the gateway's exception handlers."""
    async def wrapped(request: Request) -> Response:
        try:
            response: Response = await handler(request)
        except ApiError as exc:
            return exc.response()
        except MeshError as exc:
            return api_error_for(exc).response()
        return response
    return wrapped
