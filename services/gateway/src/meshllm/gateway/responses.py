"""Building OpenAI response objects and server-sent events (pure functions)."""

from __future__ import annotations

import codecs
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from meshllm.common.toolcalls import parse_tool_calls
from meshllm.common.types import TokenLogprob, ToolCall, Usage
from meshllm.gateway.choices import ChoiceOutput
from meshllm.gateway.openai_api import ApiRequest


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def _object(req: ApiRequest, stream: bool) -> str:
    if req.kind == "chat":
        return "chat.completion.chunk" if stream else "chat.completion"
    return "text_completion"


def envelope(req: ApiRequest, rid: str, created: int, stream: bool) -> dict[str, Any]:
    return {"id": rid, "object": _object(req, stream), "created": created, "model": req.model,
            "system_fingerprint": "mesh-llm"}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def tool_call_dict(call: ToolCall) -> dict[str, Any]:
    return {"id": call.call_id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def _top(t: TokenLogprob) -> list[dict[str, Any]]:
    return [{"token": x.token, "logprob": x.logprob, "bytes": list(x.token_bytes)}
            for x in t.top]


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token_bytes),
                         "top_logprobs": _top(t)} for t in tokens],
            "refusal": None}


class TextOffsets:
    """Character offsets of tokens in a choice's text (a character split across tokens
    counts at the token that completes it)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0

    def next(self, token_bytes: bytes) -> int:
        offset = self._chars
        self._chars += len(self._decoder.decode(token_bytes))
        return offset


def completion_logprobs(tokens: Sequence[TokenLogprob], offsets: TextOffsets
                        ) -> dict[str, Any]:
    """The legacy shape; each top_logprobs entry also holds the chosen token, as OpenAI's."""
    return {"tokens": [t.token for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{**{x.token: x.logprob for x in t.top}, t.token: t.logprob}
                             for t in tokens],
            "text_offset": [offsets.next(t.token_bytes) for t in tokens]}


def logprobs_dict(req: ApiRequest, tokens: Sequence[TokenLogprob], offsets: TextOffsets
                  ) -> dict[str, Any] | None:
    if req.logprobs is None:
        return None
    return chat_logprobs(tokens) if req.kind == "chat" else completion_logprobs(tokens, offsets)


def named_calls(req: ApiRequest, calls: Sequence[ToolCall]) -> list[ToolCall]:
    """The calls the answer keeps (one without parallel calls), each with a new id."""
    kept = calls if req.parallel_tool_calls else calls[:1]
    return [replace(c, call_id=new_call_id()) for c in kept]


def call_finish_reason(finish_reason: str) -> str:
    """The finish reason of an answer that called tools: `length` stays (the answer was
    cut, maybe inside a call, which then stays text)."""
    return "tool_calls" if finish_reason == "stop" else finish_reason


def _message(req: ApiRequest, text: str, finish_reason: str) -> tuple[dict[str, Any], str]:
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if req.tool_names:
        content, calls = parse_tool_calls(text, req.tool_names)
        if calls:
            message["content"] = content or None
            message["tool_calls"] = [tool_call_dict(c) for c in named_calls(req, calls)]
            finish_reason = call_finish_reason(finish_reason)
    return message, finish_reason


def choice_dict(req: ApiRequest, index: int, out: ChoiceOutput) -> dict[str, Any]:
    assert out.finished is not None
    finish_reason = out.finished.finish_reason
    choice: dict[str, Any] = {"index": index}
    if req.kind == "chat":
        choice["message"], finish_reason = _message(req, out.text, finish_reason)
    else:
        choice["text"] = out.text
    choice["finish_reason"] = finish_reason
    choice["logprobs"] = logprobs_dict(req, out.logprobs, TextOffsets())
    return choice


def full_response(req: ApiRequest, rid: str, created: int, outputs: Sequence[ChoiceOutput],
                  usage: Usage) -> dict[str, Any]:
    return {**envelope(req, rid, created, False),
            "choices": [choice_dict(req, i, out) for i, out in enumerate(outputs)],
            "usage": usage_dict(usage)}


def chunk(req: ApiRequest, rid: str, created: int, choice: dict[str, Any]) -> dict[str, Any]:
    return {**envelope(req, rid, created, True), "choices": [choice]}


def usage_chunk(req: ApiRequest, rid: str, created: int, usage: Usage) -> dict[str, Any]:
    return {**envelope(req, rid, created, True), "choices": [], "usage": usage_dict(usage)}


# Legal inside an SSE line, but every client that splits lines with str.splitlines()
# (httpx's and requests' iter_lines among them) breaks a chunk there: escaped, as JSON allows.
LINE_BREAKING = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def sse_json(data: Mapping[str, Any]) -> bytes:
    """`data` as one line of UTF-8 JSON that no line splitter breaks."""
    return json.dumps(data, ensure_ascii=False).translate(LINE_BREAKING).encode()


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + sse_json(data) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
