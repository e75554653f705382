"""Limits on hostile input: body size, JSON nesting, and the counts and caps of a request's
fields. Each is configurable (`InputLimits`, from the gateway config); each refusal is a
typed error that the HTTP edge maps to a 4xx in the OpenAI shape.

The request parsers (openai_api, chat_api) check the protocol maxima declared here (stop
sequences, n, tools); the configured limits may only tighten those (the config loader
checks)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from meshllm.common.config import format_size
from meshllm.common.errors import InvalidGenerateRequest

Receive = Callable[[], Awaitable[Mapping[str, Any]]]
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
ITEM_LIST_FIELDS = ("messages", "input")  # chat messages; responses and embeddings inputs
# The most the request parsers accept (stop: OpenAI's own cap); a configured limit may only
# tighten these.
MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 16             # n
MAX_TOOLS = 128


class InputLimitExceeded(InvalidGenerateRequest):
    """A request field is over one of the configured limits."""

    reason = "input_limit_exceeded"


class RequestTooLarge(InputLimitExceeded):
    reason = "request_too_large"


class NestingTooDeep(InputLimitExceeded):
    reason = "json_too_deep"


@dataclass(frozen=True)
class InputLimits:
    max_body_bytes: int = 4 * 1024 * 1024   # request body, bytes
    max_json_depth: int = 64                # nested arrays and objects
    max_messages: int = 2048                # items of `messages` or `input`
    max_tools: int = MAX_TOOLS              # entries of `tools`
    max_output_tokens: int = 0              # cap on max_tokens & co (0: the model's context)
    max_n: int = MAX_CHOICES                # choices per request
    max_stop: int = MAX_STOP_SEQUENCES      # stop sequences
    max_stop_chars: int = 256               # characters of one stop sequence


def check_content_length(headers: Mapping[str, str], limits: InputLimits) -> None:
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise _too_large(limits)


async def read_body(receive: Receive, limits: InputLimits) -> bytes:
    """The whole request body, refused as soon as it grows past the limit (never read
    further into memory)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":   # the client went away
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise _too_large(limits)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _too_large(limits: InputLimits) -> RequestTooLarge:
    return RequestTooLarge(f"The request body is larger than "
                           f"{format_size(limits.max_body_bytes)}.")


def parse_body(body: bytes, limits: InputLimits) -> Any:
    """The body's JSON value (None when it is no JSON: the handler says why), refused when
    nested deeper than the limit."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise _too_deep(limits) from None
    except ValueError:
        return None
    if _depth(data, limits.max_json_depth) > limits.max_json_depth:
        raise _too_deep(limits)
    return data


def _too_deep(limits: InputLimits) -> NestingTooDeep:
    return NestingTooDeep(f"The request body nests arrays and objects deeper than "
                          f"{limits.max_json_depth} levels.")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, counted iteratively and given up past `limit`."""
    deepest = 0
    pending = [(value, 1)]
    while pending:
        item, level = pending.pop()
        children = (item.values() if isinstance(item, dict)
                    else item if isinstance(item, list) else None)
        if children is None:
            continue
        deepest = max(deepest, level)
        if deepest > limit:
            return deepest
        pending.extend((child, level + 1) for child in children)
    return deepest


def check_request(data: Mapping[str, Any], limits: InputLimits) -> None:
    """Refuse an API request whose fields are over the limits (types are the parsers')."""
    for name in ITEM_LIST_FIELDS:
        _at_most(data.get(name), limits.max_messages, name, "items")
    _at_most(data.get("tools"), limits.max_tools, "tools", "tools")
    if limits.max_output_tokens:
        for name in MAX_TOKENS_FIELDS:
            _number_at_most(data.get(name), limits.max_output_tokens, name)
    _number_at_most(data.get("n"), limits.max_n, "n")
    stop = data.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    _at_most(stops, limits.max_stop, "stop", "sequences")
    if isinstance(stops, list) and any(isinstance(s, str) and len(s) > limits.max_stop_chars
                                       for s in stops):
        raise InputLimitExceeded(f"a stop sequence may be at most {limits.max_stop_chars} "
                                 "characters long", "stop")


def _at_most(value: Any, limit: int, param: str, what: str) -> None:
    if isinstance(value, list) and len(value) > limit:
        raise InputLimitExceeded(f"{param} may hold at most {limit} {what}, got {len(value)}",
                                 param)


def _number_at_most(value: Any, limit: int, param: str) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value > limit:
        raise InputLimitExceeded(f"{param} may be at most {limit}, got {value}", param)
