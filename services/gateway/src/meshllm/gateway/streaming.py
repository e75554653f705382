"""One choice of a streamed answer: worker events -> the choice objects of OpenAI chunks.

Text goes out as it comes. When the answer is read for tool calls, text that may be the
start of a call is held back until it is known, and each call goes out, once its block is
complete, as OpenAI streams calls: a first `delta.tool_calls` entry with index, id, type,
name and empty arguments, then the arguments. Logprobs go out with the chunk that carries
their text (or the next one, when the text was held back)."""

from __future__ import annotations

from typing import Any

from meshllm.common.toolcalls import CallFound, Content, StreamEvent, ToolCallStream
from meshllm.common.types import Finished, TokenDelta, TokenLogprob
from meshllm.gateway import responses
from meshllm.gateway.openai_api import ApiRequest


class ChoiceStream:
    def __init__(self, req: ApiRequest, index: int) -> None:
        self._req = req
        self._index = index
        self._tools = ToolCallStream(req.tool_names) if req.tool_names else None
        self._logprobs: list[TokenLogprob] = []  # not yet sent
        self._offsets = responses.TextOffsets()
        self._calls = 0

    def opening(self) -> list[dict[str, Any]]:
        """Chat streams open each choice with the assistant role."""
        if self._req.kind != "chat":
            return []
        return [{"index": self._index, "delta": {"role": "assistant", "content": ""},
                 "finish_reason": None, "logprobs": None}]

    def delta(self, event: TokenDelta) -> list[dict[str, Any]]:
        self._logprobs.extend(event.logprobs)
        if self._tools is not None:
            return self._read(self._tools.feed(event.text))
        return [self._text(event.text)] if event.text else []

    def finish(self, event: Finished) -> list[dict[str, Any]]:
        out = self._read(self._tools.finish()) if self._tools is not None else []
        reason = event.finish_reason
        if self._calls:
            reason = responses.call_finish_reason(reason)
        if self._req.kind == "chat":
            out.append(self._choice({"delta": {}}, reason))
        else:
            out.append(self._choice({"text": ""}, reason))
        return out

    def _choice(self, body: dict[str, Any], finish_reason: str | None = None
                ) -> dict[str, Any]:
        logprobs = responses.logprobs_dict(self._req, self._logprobs, self._offsets)
        self._logprobs = []
        return {"index": self._index, **body, "finish_reason": finish_reason,
                "logprobs": logprobs}

    def _text(self, text: str) -> dict[str, Any]:
        if self._req.kind == "chat":
            return self._choice({"delta": {"content": text}})
        return self._choice({"text": text})

    def _read(self, events: list[StreamEvent]) -> list[dict[str, Any]]:
        out = []
        for event in events:
            if isinstance(event, Content):
                out.append(self._text(event.text))
            elif isinstance(event, CallFound) and (self._req.parallel_tool_calls
                                                   or not self._calls):
                out.extend(self._call(event))
        return out

    def _call(self, found: CallFound) -> list[dict[str, Any]]:
        call = responses.named_calls(self._req, [found.call])[0]
        index, self._calls = self._calls, self._calls + 1
        start = {"index": index, "id": call.call_id, "type": "function",
                 "function": {"name": call.name, "arguments": ""}}
        arguments = {"index": index, "function": {"arguments": call.arguments}}
        return [self._choice({"delta": {"tool_calls": [start]}}),
                self._choice({"delta": {"tool_calls": [arguments]}})]
