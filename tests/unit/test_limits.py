"""Limits on hostile input: body size while reading, JSON nesting, field counts and caps,
their configuration, and the 4xx answers the gate gives for them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import pytest
from meshllm.common.errors import ConfigError
from meshllm.gateway.auth import KeyRing
from meshllm.gateway.config import load_config
from meshllm.gateway.gate import Gate, front_door
from meshllm.gateway.limits import (
    InputLimitExceeded,
    InputLimits,
    NestingTooDeep,
    RequestTooLarge,
    check_content_length,
    check_request,
    parse_body,
    read_body,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

LIMITS = InputLimits(max_body_bytes=100, max_json_depth=3, max_messages=2, max_tools=1,
                     max_output_tokens=50, max_n=2, max_stop=2, max_stop_chars=5)


@pytest.mark.parametrize(("data", "param"), [
    ({"messages": [{}, {}, {}]}, "messages"),
    ({"input": ["a", "b", "c"]}, "input"),
    ({"tools": [{}, {}]}, "tools"),
    ({"max_tokens": 51}, "max_tokens"),
    ({"max_completion_tokens": 51}, "max_completion_tokens"),
    ({"max_output_tokens": 51}, "max_output_tokens"),
    ({"n": 3}, "n"),
    ({"stop": ["a", "b", "c"]}, "stop"),
    ({"stop": "toolong"}, "stop"),
    ({"stop": ["ok", "toolong"]}, "stop"),
])
def test_over_a_limit(data: Mapping[str, Any], param: str) -> None:
    with pytest.raises(InputLimitExceeded) as info:
        check_request(data, LIMITS)
    assert info.value.param == param


@pytest.mark.parametrize("data", [
    {"messages": [{}, {}], "input": "a long string is one input", "tools": [{}]},
    {"max_tokens": 50, "n": 2, "stop": ["abcde", "x"]},
    {"stop": "abcde"},
    {"n": True, "max_tokens": "lots", "tools": "not a list"},  # types are the parser's
    {},
])
def test_within_the_limits(data: Mapping[str, Any]) -> None:
    check_request(data, LIMITS)


def test_no_output_cap_by_default() -> None:
    check_request({"max_tokens": 1 << 30}, InputLimits())


@pytest.mark.parametrize(("body", "deep"), [
    (b'{"a": {"b": [1]}}', False),        # depth 3
    (b'{"a": {"b": [[1]]}}', True),        # depth 4
    (b'[[[]]]', False),
    (b'[[[[]]]]', True),
    (b'{"a": [1, 2, {"b": 3}]}', False),
    (b'{"a": [1, 2, {"b": {}}]}', True),
    (b'[' * 100_000 + b']' * 100_000, True),  # deeper than Python's recursion limit
])
def test_nesting(body: bytes, deep: bool) -> None:
    if deep:
        with pytest.raises(NestingTooDeep):
            parse_body(body, LIMITS)
    else:
        assert parse_body(body, LIMITS) == json.loads(body)


def test_a_body_that_is_no_json_is_left_to_the_handler() -> None:
    assert parse_body(b"{not json", LIMITS) is None


def _chunks(*parts: bytes) -> tuple[Any, list[int]]:
    """A `receive` handing out `parts`, and how many it handed out."""
    given = [0]

    async def receive() -> dict[str, Any]:
        index = given[0]
        given[0] += 1
        return {"type": "http.request", "body": parts[index],
                "more_body": index < len(parts) - 1}
    return receive, given


def test_the_body_is_read_whole_within_the_limit() -> None:
    receive, _ = _chunks(b"a" * 60, b"b" * 40)
    assert asyncio.run(read_body(receive, LIMITS)) == b"a" * 60 + b"b" * 40


def test_the_body_is_refused_as_soon_as_it_grows_past_the_limit() -> None:
    receive, given = _chunks(b"a" * 60, b"b" * 60, *([b"c" * 1000] * 50))
    with pytest.raises(RequestTooLarge):
        asyncio.run(read_body(receive, LIMITS))
    assert given[0] == 2  # nothing read past the chunk that crossed the limit


@pytest.mark.parametrize(("length", "refused"), [("100", False), ("101", True),
                                                 ("", False), ("junk", False)])
def test_a_declared_length_over_the_limit_is_refused_before_reading(length: str,
                                                                     refused: bool) -> None:
    headers = {"content-length": length} if length else {}
    if refused:
        with pytest.raises(RequestTooLarge):
            check_content_length(headers, LIMITS)
    else:
        check_content_length(headers, LIMITS)


# --- configuration ---

def test_the_limits_have_defaults_and_flags() -> None:
    assert load_config([], {}).limits == InputLimits()
    assert InputLimits().max_body_bytes == 4 * 1024 * 1024
    limits = load_config(["--max-body-size", "1MiB", "--max-n", "4", "--max-json-depth", "8"],
                         {"MESHLLM_MAX_OUTPUT_TOKENS": "512", "MESHLLM_MAX_MESSAGES": "10"}
                         ).limits
    assert (limits.max_body_bytes, limits.max_n, limits.max_json_depth,
            limits.max_output_tokens, limits.max_messages) == (1 << 20, 4, 8, 512, 10)


@pytest.mark.parametrize(("argv", "key"), [
    (["--max-n", "17"], "--max-n / MESHLLM_MAX_N"),          # wider than the parser takes
    (["--max-stop", "5"], "--max-stop / MESHLLM_MAX_STOP"),
    (["--max-tools", "129"], "--max-tools / MESHLLM_MAX_TOOLS"),
    (["--max-output-tokens", "-1"], "--max-output-tokens / MESHLLM_MAX_OUTPUT_TOKENS"),
    (["--max-body-size", "lots"], "--max-body-size / MESHLLM_MAX_BODY_SIZE"),
    (["--max-json-depth", "0"], "--max-json-depth / MESHLLM_MAX_JSON_DEPTH"),
])
def test_bad_limits_name_the_option(argv: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(argv, {})
    assert info.value.key == key


def test_cors_origins_are_off_by_default() -> None:
    assert load_config([], {}).cors_origins == ()
    assert load_config(["--cors-origins", "https://a.example, https://b.example"], {}
                       ).cors_origins == ("https://a.example", "https://b.example")


# --- through the gate ---

def _client() -> TestClient:
    async def echo(request: Request) -> Response:
        return JSONResponse({"size": len(await request.body())})

    app = Starlette(routes=[Route("/v1/completions", echo, methods=["POST"]),
                            Route("/api/blackboard/posts", echo, methods=["POST"])])
    return TestClient(front_door(app, Gate(KeyRing(()), LIMITS), ()))


def test_an_oversized_body_is_413_in_the_openai_shape() -> None:
    response = _client().post("/v1/completions", content=b"x" * 101,
                              headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"] == {
        "message": "The request body is larger than 100 B.", "type": "invalid_request_error",
        "param": None, "code": "request_too_large"}


def test_a_streamed_body_without_length_is_refused_while_read() -> None:
    def chunks() -> Any:
        yield b"x" * 80
        yield b"x" * 80
    response = _client().post("/v1/completions", content=chunks())
    assert response.status_code == 413


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"model": "m", "n": 3}, 400, "input_limit_exceeded"),
    ({"model": "m", "x": [[[[1]]]]}, 400, "json_too_deep"),
    ({"model": "m", "n": 2}, 200, None),
])
def test_limits_answer_before_the_handler(body: Mapping[str, Any], status: int,
                                          code: str | None) -> None:
    content = json.dumps(body).encode()
    response = _client().post("/v1/completions", content=content)
    assert response.status_code == status
    if code:
        assert response.json()["error"]["code"] == code
    else:
        assert response.json() == {"size": len(content)}  # the handler reads it all


def test_field_limits_are_for_the_api_only_but_depth_and_size_for_all() -> None:
    client = _client()
    assert client.post("/api/blackboard/posts", json={"n": 3}).status_code == 200
    assert client.post("/api/blackboard/posts", json={"x": [[[[1]]]]}).status_code == 400
