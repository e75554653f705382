"""Building OpenAI response objects and server-sent events (pure functions)."""

from __future__ import annotations

import json
from typing import Any

from meshllm.common.types import Usage
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


def full_response(req: ApiRequest, rid: str, created: int, text: str, finish_reason: str,
                  usage: Usage) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if req.kind == "chat":
        choice["message"] = {"role": "assistant", "content": text, "refusal": None}
    else:
        choice["text"] = text
    return {**envelope(req, rid, created, False), "choices": [choice],
            "usage": usage_dict(usage)}


def chunk(req: ApiRequest, rid: str, created: int, text: str | None,
          finish_reason: str | None = None, role: bool = False) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if req.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    return {**envelope(req, rid, created, True), "choices": [choice]}


def usage_chunk(req: ApiRequest, rid: str, created: int, usage: Usage) -> dict[str, Any]:
    return {**envelope(req, rid, created, True), "choices": [], "usage": usage_dict(usage)}


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
