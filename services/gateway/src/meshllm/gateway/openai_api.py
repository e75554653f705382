"""Validating OpenAI request bodies into domain requests (pure functions)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from meshllm.common.types import ChatMessage, Grammar, SamplingParams
from meshllm.gateway.chat_api import (
    parallel_tool_calls,
    parse_messages,
    parse_tool_choice,
    parse_tools,
)
from meshllm.gateway.errors import invalid
from meshllm.gateway.limits import MAX_CHOICES, MAX_STOP_SEQUENCES
from meshllm.gateway.structured import (
    FunctionTool,
    ToolChoice,
    output_grammar,
    response_format_schema,
    schema_grammar,
)

MAX_TOP_LOGPROBS = 20        # chat top_logprobs, as OpenAI
MAX_COMPLETION_LOGPROBS = 20  # completions logprobs: OpenAI allows 5, vLLM 20
MAX_LOGIT_BIAS = 1024        # entries
UNSUPPORTED = {
    "functions": "the legacy functions parameter is not supported; use tools",
    "function_call": "the legacy function_call parameter is not supported; use tool_choice",
    "echo": "echo is not supported",
    "suffix": "suffix (insertion) is not supported",
    "best_of": "best_of is not supported; use n",
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
    n: int = 1                          # independent choices
    logprobs: int | None = None         # None: none; k: each token's and its top k
    grammar: Grammar | None = None      # the answer must match it
    tools_json: str = ""                # the tools to render into the prompt (a JSON list)
    tool_names: tuple[str, ...] = ()    # the answer is read for calls to these
    parallel_tool_calls: bool = True
    session: str = ""                   # X-Session-Id, else `user`: one replica serves it


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


def _logit_bias(data: Mapping[str, Any]) -> tuple[tuple[int, float], ...]:
    value = data.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise invalid(f"logit_bias must be an object of at most {MAX_LOGIT_BIAS} token ids "
                      "(as strings) to biases", "logit_bias")
    out = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < 1 << 32):
            raise invalid(f"logit_bias: {key!r} is not a token id", "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not (
                -100 <= bias <= 100):
            raise invalid(f"logit_bias[{key}] must be a number from -100 to 100",
                          "logit_bias")
        out.append((int(key), float(bias)))
    return tuple(sorted(out))


def _repeat_penalty(data: Mapping[str, Any]) -> float:
    key = "repetition_penalty" if "repetition_penalty" in data else "repeat_penalty"  # vLLM's
    penalty = _number(data, key, 1.0, 0.0, 10.0)
    if penalty <= 0:
        raise invalid(f"{key} must be above 0 (1 leaves the distribution as it is)", key)
    return penalty


def _top_k(data: Mapping[str, Any]) -> int:
    top_k = _integer(data, "top_k", -1, 1 << 31)
    return 0 if top_k is None or top_k < 0 else top_k  # -1 is vLLM's "off"; 0 is ours


def sampling(data: Mapping[str, Any],
             max_tokens_keys: tuple[str, ...] = ("max_completion_tokens", "max_tokens")
             ) -> SamplingParams:
    """The sampling of a request; the first of `max_tokens_keys` given bounds the answer."""
    max_tokens = None
    for key in max_tokens_keys:
        if max_tokens is None:
            max_tokens = _integer(data, key, 1, 1 << 30)
    return SamplingParams(
        max_tokens=max_tokens or 0,
        temperature=_number(data, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(data, "top_p", 1.0, 0.0, 1.0) or 1.0,
        seed=_seed(data),
        stop=_stop(data),
        top_k=_top_k(data),
        presence_penalty=_number(data, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(data, "frequency_penalty", 0.0, -2.0, 2.0),
        repeat_penalty=_repeat_penalty(data),
        min_p=_number(data, "min_p", 0.0, 0.0, 1.0),
        logit_bias=_logit_bias(data),
    )


def _chat_logprobs(data: Mapping[str, Any]) -> int | None:
    wanted = data.get("logprobs")
    if wanted not in (None, True, False):
        raise invalid("logprobs must be a boolean (top_logprobs says how many "
                      "alternatives)", "logprobs")
    top = _integer(data, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if wanted else None


def _completion_logprobs(data: Mapping[str, Any]) -> int | None:
    if data.get("logprobs") is True:  # a chat-style flag sent to completions
        raise invalid(f"logprobs must be an integer from 0 to {MAX_COMPLETION_LOGPROBS}",
                      "logprobs")
    return _integer(data, "logprobs", 0, MAX_COMPLETION_LOGPROBS)


def _common(data: Mapping[str, Any]) -> tuple[str, bool, bool]:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model is required and must be a string", "model")
    for key, why in UNSUPPORTED.items():
        value = data.get(key)
        if value not in (None, False, [], 0) and not (key == "best_of" and value == 1):
            raise invalid(f"{key}: {why}", key, "unsupported_parameter")
    stream = data.get("stream")
    if stream is None:  # nullable in the API, as most optional fields are
        stream = False
    if not isinstance(stream, bool):
        raise invalid("stream must be a boolean", "stream")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("stream_options must be an object", "stream_options")
    if options and not stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    return model, stream, bool(options.get("include_usage", False))


@dataclass(frozen=True)
class ChatTools:
    """A chat request's validated tools, tool_choice and parallel_tool_calls."""

    tools: tuple[FunctionTool, ...]
    choice: ToolChoice
    parallel: bool


def chat_request(model: str, messages: tuple[ChatMessage, ...], params: SamplingParams,
                 stream: bool, tools: ChatTools, answer: Mapping[str, Any] | None,
                 include_usage: bool = False, n: int = 1, logprobs: int | None = None
                 ) -> ApiRequest:
    """A chat request from its validated parts (chat completions and the Responses API):
    the grammar its tools and answer schema need, the tools the model is shown."""
    calling = bool(tools.tools) and tools.choice.mode != "none"  # `none`: never seen
    return ApiRequest(
        "chat", model, params, stream, include_usage, chat=messages, n=n, logprobs=logprobs,
        grammar=output_grammar(tools.tools, tools.choice, tools.parallel, answer),
        tools_json=json.dumps([t.to_json() for t in tools.tools], ensure_ascii=False)
        if calling else "",
        tool_names=tuple(t.name for t in tools.tools) if calling else (),
        parallel_tool_calls=tools.parallel)


def session(data: Mapping[str, Any], header: str = "") -> str:
    """The request's session: its X-Session-Id header, else its `user` field ("": none)."""
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user must be a string", "user")
    return header.strip() or (user or "")


def parse_chat(data: Mapping[str, Any], session_header: str = "") -> ApiRequest:
    model, stream, include_usage = _common(data)
    messages = parse_messages(data)
    tools = parse_tools(data)
    chat_tools = ChatTools(tools, parse_tool_choice(data, tools), parallel_tool_calls(data))
    answer = response_format_schema(data.get("response_format"))
    request = chat_request(model, messages, sampling(data), stream, chat_tools, answer,
                           include_usage, n=_integer(data, "n", 1, MAX_CHOICES) or 1,
                           logprobs=_chat_logprobs(data))
    return replace(request, session=session(data, session_header))


def parse_completion(data: Mapping[str, Any], session_header: str = "") -> ApiRequest:
    model, stream, include_usage = _common(data)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("prompt must be a string (token arrays and batches are not supported)",
                      "prompt")
    schema = response_format_schema(data.get("response_format"))
    return ApiRequest("completion", model, sampling(data), stream, include_usage, text=prompt,
                      n=_integer(data, "n", 1, MAX_CHOICES) or 1,
                      logprobs=_completion_logprobs(data),
                      grammar=schema_grammar(schema) if schema is not None else None,
                      session=session(data, session_header))
