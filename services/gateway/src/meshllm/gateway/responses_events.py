"""The Responses API's response object, output items and stream events (pure builders).

Not to be confused with `responses.py`, which builds chat/completions answers: this module
takes what that chat path produced (a finished choice's message, or the chat choices of a
streamed one, tool calls already read from the text) and gives it the Responses shape:
output items (`message` with `output_text` content, `function_call`), and the documented
event sequence, each event numbered (`sequence_number`)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshllm.common.types import Usage
from meshllm.gateway.errors import ApiError
from meshllm.gateway.responses import sse_json
from meshllm.gateway.responses_api import ResponsesRequest

# An API error's type -> the Responses error code (a closed list in the API).
ERROR_CODES = {"rate_limit_error": "rate_limit_exceeded",
               "invalid_request_error": "invalid_prompt"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage_object(usage: Usage) -> dict[str, Any]:
    # The worker's KV cache keeps every prompt token it did not read from the cache.
    return {"input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens,
                                     "cache_write_tokens": usage.prompt_tokens
                                     - usage.cached_tokens},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens}


def error_object(error: ApiError) -> dict[str, str]:
    return {"code": ERROR_CODES.get(error.type, "server_error"), "message": error.message}


@dataclass(frozen=True)
class ResponseHead:
    """What every state of one response shares."""

    req: ResponsesRequest
    response_id: str
    created_at: int

    def response(self, status: str, output: list[dict[str, Any]], usage: Usage | None,
                 error: ApiError | None = None, completed_at: int | None = None
                 ) -> dict[str, Any]:
        """The response object; status: in_progress | completed | incomplete | failed.
        Without usage (not yet known, or the answer failed) it has no `usage` field."""
        response = {"id": self.response_id, "object": "response", "created_at": self.created_at,
                "status": status, "completed_at": completed_at,
                "error": error_object(error) if error is not None else None,
                "incomplete_details": {"reason": "max_output_tokens"}
                if status == "incomplete" else None,
                "model": self.req.chat.model, "output": output,
                **self.req.settings, "previous_response_id": None, "reasoning": None,
                "store": False, "truncation": "disabled"}
        if usage is not None:
            response["usage"] = usage_object(usage)
        return response


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    """An assistant message; text None: just opened, no content part yet."""
    content = [] if text is None else [text_part(text)]
    return {"type": "message", "id": item_id, "role": "assistant", "status": status,
            "content": content}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str
              ) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def output_items(message: Mapping[str, Any], status: str) -> list[dict[str, Any]]:
    """A chat answer's message ({content, tool_calls}) as output items: its text (when it
    has some, or nothing else), then one item per call. A call read from the answer is
    whole, so it is completed even when the answer was cut later."""
    calls = message.get("tool_calls") or []
    items = []
    if message.get("content") or not calls:
        items.append(message_item(new_id("msg"), message.get("content") or "", status))
    items.extend(call_item(new_id("fc"), c["id"], c["function"]["name"],
                           c["function"]["arguments"], "completed") for c in calls)
    return items


def final_status(finish_reason: str) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def sse_event(event: Mapping[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: ".encode() + sse_json(event) + b"\n\n"


def full_response(head: ResponseHead, message: Mapping[str, Any], finish_reason: str,
                  usage: Usage, now: int) -> dict[str, Any]:
    """The response to a finished chat answer (its message and finish reason)."""
    status = final_status(finish_reason)
    return head.response(status, output_items(message, status), usage,
                         completed_at=now if status == "completed" else None)


@dataclass
class _OpenItem:
    """The output item being streamed."""

    index: int
    item_id: str
    kind: str       # message | function_call
    text: str = ""  # the message's text, or the call's arguments so far
    call_id: str = ""
    name: str = ""

    def item(self, status: str) -> dict[str, Any]:
        if self.kind == "message":
            return message_item(self.item_id, None if status == "in_progress" else self.text,
                                status)
        return call_item(self.item_id, self.call_id, self.name,
                         "" if status == "in_progress" else self.text, status)


class ResponseEvents:
    """The events of one streamed response, in order and numbered, from the chat choices
    a `ChoiceStream` makes of the worker's events (text deltas, then whole calls)."""

    def __init__(self, head: ResponseHead) -> None:
        self._head = head
        self._sequence = 0
        self._output: list[dict[str, Any]] = []  # the items done
        self._open: _OpenItem | None = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def opening(self) -> list[dict[str, Any]]:
        response = self._head.response("in_progress", [], None)
        return [self._event("response.created", response=response),
                self._event("response.in_progress", response=response)]

    def choice(self, choice: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The events of one chat chunk's choice (its finish reason is not read here)."""
        delta = choice.get("delta") or {}
        out = self._text(delta["content"]) if delta.get("content") else []
        for call in delta.get("tool_calls") or []:
            out.extend(self._call(call))
        return out

    def finish(self, finish_reason: str, usage: Usage, now: int) -> list[dict[str, Any]]:
        status = final_status(finish_reason)
        out = self._close(status)
        if not self._output:  # an empty answer is still a message, as unstreamed
            out += self._start(_OpenItem(0, new_id("msg"), "message")) + self._close(status)
        response = self._head.response(status, list(self._output), usage,
                                       completed_at=now if status == "completed" else None)
        out.append(self._event(f"response.{status}", response=response))
        return out

    def failed(self, error: ApiError) -> list[dict[str, Any]]:
        """The end of a stream that broke: the open item incomplete, the response failed."""
        out = self._close("incomplete")
        response = self._head.response("failed", list(self._output), None, error)
        out.append(self._event("response.failed", response=response))
        return out

    def _text(self, text: str) -> list[dict[str, Any]]:
        out = []
        if self._open is None or self._open.kind != "message":
            out = self._close("completed")
            out += self._start(_OpenItem(len(self._output), new_id("msg"), "message"))
        assert self._open is not None
        self._open.text += text
        out.append(self._event("response.output_text.delta", item_id=self._open.item_id,
                               output_index=self._open.index, content_index=0, delta=text,
                               logprobs=[]))
        return out

    def _call(self, call: Mapping[str, Any]) -> list[dict[str, Any]]:
        out = []
        function = call.get("function") or {}
        if "id" in call:  # a call's first entry: id and name, then its arguments
            out = self._close("completed")
            out += self._start(_OpenItem(len(self._output), new_id("fc"), "function_call",
                                         call_id=call["id"], name=function.get("name", "")))
        arguments = function.get("arguments") or ""
        if arguments and self._open is not None:
            self._open.text += arguments
            out.append(self._event("response.function_call_arguments.delta",
                                   item_id=self._open.item_id,
                                   output_index=self._open.index, delta=arguments))
        return out

    def _start(self, item: _OpenItem) -> list[dict[str, Any]]:
        self._open = item
        out = [self._event("response.output_item.added", output_index=item.index,
                           item=item.item("in_progress"))]
        if item.kind == "message":
            out.append(self._event("response.content_part.added", item_id=item.item_id,
                                   output_index=item.index, content_index=0,
                                   part=text_part("")))
        return out

    def _close(self, status: str) -> list[dict[str, Any]]:
        item, self._open = self._open, None
        if item is None:
            return []
        done = item.item(status if item.kind == "message" else "completed")  # calls: whole
        self._output.append(done)
        where = {"item_id": item.item_id, "output_index": item.index}
        if item.kind == "message":
            out = [self._event("response.output_text.done", **where, content_index=0,
                               text=item.text, logprobs=[]),
                   self._event("response.content_part.done", **where, content_index=0,
                               part=text_part(item.text))]
        else:
            out = [self._event("response.function_call_arguments.done", **where,
                               name=item.name, arguments=item.text)]
        out.append(self._event("response.output_item.done", output_index=item.index,
                               item=done))
        return out
