"""Validating OpenAI request bodies into domain requests (pure functions)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshllm.common.types import ChatMessage, SamplingParams
from meshllm.gateway.errors import invalid

MAX_STOP_SEQUENCES = 4
UNSUPPORTED = {
    "tools": "tool calling is not supported yet",
    "functions": "function calling is not supported yet",
    "logprobs": "logprobs are not supported yet",
    "echo": "echo is not supported",
    "suffix": "suffix (insertion) is not supported",
}


@dataclass(frozen=True)
class ApiRequest:
    """A validated chat or completions request."""

    kind: str                           # "chat" | "completion"
    model: str
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    text: str | None = None
    chat: tuple[ChatMessage, ...] | None = None


def parse_json(body: bytes) -> Mapping[str, Any]:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object.")
    return data


def _number(data: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"{key} must be a number, got {type(value).__name__}", key)
    if not low <= value <= high:
        raise invalid(f"{key} must be between {low:g} and {high:g}, got {value}", key)
    return float(value)


def _integer(data: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{key} must be an integer, got {json.dumps(value)}", key)
    if not low <= value <= high:
        raise invalid(f"{key} must be between {low} and {high}, got {value}", key)
    return value


def _stop(data: Mapping[str, Any]) -> tuple[str, ...]:
    stop = data.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop must be a non-empty string or a list of non-empty strings", "stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid(f"stop accepts at most {MAX_STOP_SEQUENCES} sequences", "stop")
    return tuple(stops)


def _seed(data: Mapping[str, Any]) -> int | None:
    seed = _integer(data, "seed", -(1 << 63), (1 << 64) - 1)
    return None if seed is None else seed % (1 << 64)  # the wire carries an unsigned seed


def _sampling(data: Mapping[str, Any]) -> SamplingParams:
    max_tokens = _integer(data, "max_completion_tokens", 1, 1 << 30)
    if max_tokens is None:
        max_tokens = _integer(data, "max_tokens", 1, 1 << 30)
    return SamplingParams(
        max_tokens=max_tokens or 0,
        temperature=_number(data, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(data, "top_p", 1.0, 0.0, 1.0) or 1.0,
        seed=_seed(data),
        stop=_stop(data),
        presence_penalty=_number(data, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(data, "frequency_penalty", 0.0, -2.0, 2.0),
    )


def _common(data: Mapping[str, Any]) -> tuple[str, bool, bool]:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model is required and must be a string", "model")
    for key, why in UNSUPPORTED.items():
        if data.get(key) not in (None, False, [], 0):
            raise invalid(f"{key}: {why}", key, "unsupported_parameter")
    if _integer(data, "n", 1, 128) not in (None, 1):
        raise invalid("n: only one choice per request is supported", "n", "unsupported_parameter")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream must be a boolean", "stream")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("stream_options must be an object", "stream_options")
    if options and not stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    return model, stream, bool(options.get("include_usage", False))


def _content(value: Any, index: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise invalid(f"messages[{index}].content: only text parts are supported",
                              f"messages[{index}].content")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise invalid(f"messages[{index}].content must be a string or a list of text parts",
                  f"messages[{index}].content")


def _messages(data: Mapping[str, Any]) -> tuple[ChatMessage, ...]:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise invalid(f"messages[{i}].role must be system, developer, user or assistant",
                          f"messages[{i}].role")
        out.append(ChatMessage(role, _content(m.get("content"), i)))
    return tuple(out)


def parse_chat(data: Mapping[str, Any]) -> ApiRequest:
    model, stream, include_usage = _common(data)
    return ApiRequest("chat", model, _sampling(data), stream, include_usage,
                      chat=_messages(data))


def parse_completion(data: Mapping[str, Any]) -> ApiRequest:
    model, stream, include_usage = _common(data)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("prompt must be a string (token arrays and batches are not supported)",
                      "prompt")
    return ApiRequest("completion", model, _sampling(data), stream, include_usage, text=prompt)
