"""The tool-call format shared by the prompt (worker) and the reply (gateway).

A model calls a function by writing, Hermes/Qwen style, one block per call:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Reading it back is lenient, because models drift: whitespace and newlines are optional,
a missing closing tag at the end (or before the next opening tag) is tolerated, a bare JSON
object {"name", "arguments"} (or a list of them) as the whole output counts, as do Mistral's
`[TOOL_CALLS]` and Llama's `<|python_tag|>` followed by JSON. A block whose JSON is not a
call stays text. `ToolCallStream` reads output as it arrives, so a stream can send text as
soon as it is surely not part of a call, and each call once its block is complete.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from meshllm.common.types import ToolCall

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"
# Other families' markers after which the rest of the output is the call(s) as JSON.
TO_END_MARKERS = ("[TOOL_CALLS]", "<|python_tag|>")
MARKERS = (TOOL_CALL_OPEN, *TO_END_MARKERS)
_BARE_STARTS = "{[`"  # output starting so may be a bare JSON call: wait for its end

_INSTRUCTION = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>
For example:
<tool_call>
{{"name": "{example}", "arguments": {{}}}}
</tool_call>
If no function fits, answer the user directly."""


def tools_instruction(tools_json: str) -> str:
    """The text that tells a model whose template knows no tools what it may call and how."""
    tools = json.loads(tools_json)
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    names = [t.get("function", {}).get("name", "") for t in tools if isinstance(t, dict)]
    return _INSTRUCTION.format(tools=lines, example=next(iter(names), "function_name"))


def format_tool_call(call: ToolCall) -> str:
    """A call as the model would have written it (for an assistant turn in the history)."""
    try:
        arguments: Any = json.loads(call.arguments)
    except json.JSONDecodeError:
        arguments = call.arguments
    body = json.dumps({"name": call.name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def format_tool_response(content: str) -> str:
    return f"{TOOL_RESPONSE_OPEN}\n{content}\n{TOOL_RESPONSE_CLOSE}"


@dataclass(frozen=True)
class Content:
    """Text of the reply that is no part of a call."""

    text: str


@dataclass(frozen=True)
class CallFound:
    index: int       # 0, 1, ... in the order the model wrote them
    call: ToolCall   # call_id is empty: the API layer names calls


StreamEvent = Content | CallFound


def parse_tool_calls(text: str, names: Collection[str] | None = None
                     ) -> tuple[str, tuple[ToolCall, ...]]:
    """The reply's text outside calls, and its calls (only to `names` when given)."""
    stream = ToolCallStream(names)
    events = [*stream.feed(text), *stream.finish()]
    content = "".join(e.text for e in events if isinstance(e, Content))
    return content, tuple(e.call for e in events if isinstance(e, CallFound))


def _json_value(text: str, lenient: bool = True) -> Any:
    body = text.strip()
    if body.startswith("```"):
        body = body.removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        if not lenient:
            return None
    start = body.find("{")
    try:  # tolerates text after the object, e.g. a stray closing brace
        return json.JSONDecoder().raw_decode(body[start:])[0] if start >= 0 else None
    except json.JSONDecodeError:
        return None


def _call(value: Any, names: Collection[str] | None, bare: bool = False) -> ToolCall | None:
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        value = value["function"]  # {"type": "function", "function": {...}}
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    if not isinstance(name, str) or not name or (names is not None and name not in names):
        return None
    if bare and "arguments" not in value and "parameters" not in value:
        return None  # a bare object needs more than a name to be taken for a call
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            if not isinstance(json.loads(arguments), dict):
                return None
        except json.JSONDecodeError:
            return None
        return ToolCall("", name, arguments)
    if isinstance(arguments, dict):
        return ToolCall("", name, json.dumps(arguments, ensure_ascii=False))
    return None


def _calls(value: Any, names: Collection[str] | None, bare: bool) -> list[ToolCall] | None:
    """All the calls in a JSON object or list of objects, or None when any is no call."""
    items = value if isinstance(value, list) and value else [value]
    calls = [_call(item, names, bare) for item in items]
    return None if any(c is None for c in calls) else [c for c in calls if c is not None]


def _partial_marker_start(text: str) -> int:
    """Where the longest tail of `text` that could begin a marker starts (len: none)."""
    for start in range(max(0, len(text) - max(map(len, MARKERS)) + 1), len(text)):
        if any(m.startswith(text[start:]) for m in MARKERS):
            return start
    return len(text)


class ToolCallStream:
    """Reads a reply piece by piece into content and calls (see the module doc)."""

    def __init__(self, names: Collection[str] | None = None) -> None:
        self._names = names
        self._buffer = ""
        self._mode = "start"      # start | text | block | rest
        self._rest_marker = ""    # in rest mode: the marker it began with ("" bare JSON)
        self._held = ""           # whitespace before a possible call: dropped if it is one
        self._after_call = False  # whitespace right after a call is dropped
        self._count = 0

    def feed(self, text: str) -> list[StreamEvent]:
        self._buffer += text
        out: list[StreamEvent] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        self._finish_pending(out)
        text = self._held + self._buffer
        if text and not (self._after_call and not text.strip()):
            out.append(Content(text))
        self._held = self._buffer = ""
        return out

    def _step(self, out: list[StreamEvent]) -> bool:
        if self._mode == "start":
            stripped = self._buffer.lstrip()
            if not stripped:
                return False
            self._mode = "rest" if stripped[0] in _BARE_STARTS else "text"
            return self._mode == "text"
        if self._mode == "text":
            return self._step_text(out)
        if self._mode == "block":
            return self._step_block(out)
        return False

    def _step_text(self, out: list[StreamEvent]) -> bool:
        if self._after_call:
            self._buffer = self._buffer.lstrip()
            if not self._buffer:
                return False
            self._after_call = False
        found = [(i, m) for m in MARKERS if (i := self._buffer.find(m)) >= 0]
        if found:
            at, marker = min(found)
            self._emit(self._buffer[:at], out)
            self._buffer = self._buffer[at:]
            self._mode = "block" if marker == TOOL_CALL_OPEN else "rest"
            self._rest_marker = marker
            return True
        safe = _partial_marker_start(self._buffer)
        self._emit(self._buffer[:safe], out)
        self._buffer = self._buffer[safe:]
        return False

    def _emit(self, text: str, out: list[StreamEvent]) -> None:
        """Sends text, keeping back trailing whitespace until what follows is known."""
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body):]
        if body:
            out.append(Content(body))

    def _step_block(self, out: list[StreamEvent]) -> bool:
        start = len(TOOL_CALL_OPEN)
        close, reopen = self._buffer.find(TOOL_CALL_CLOSE, start), self._buffer.find(
            TOOL_CALL_OPEN, start)
        if close < 0 and reopen < 0:
            return False
        if close >= 0 and (reopen < 0 or close < reopen):
            end = close + len(TOOL_CALL_CLOSE)
            body, raw, rest = self._buffer[start:close], self._buffer[:end], self._buffer[end:]
        else:  # the closing tag is missing before the next call
            body, raw, rest = self._buffer[start:reopen], self._buffer[:reopen], self._buffer[
                reopen:]
        self._resolve_block(body, raw, rest, out)
        return True

    def _resolve_block(self, body: str, raw: str, rest: str, out: list[StreamEvent]) -> None:
        call = _call(_json_value(body), self._names)
        if call is None:
            out.append(Content(self._held + raw))
        else:
            self._found([call], out)
        self._held, self._buffer, self._mode = "", rest, "text"

    def _found(self, calls: list[ToolCall], out: list[StreamEvent]) -> None:
        for call in calls:
            out.append(CallFound(self._count, call))
            self._count += 1
        self._after_call = True

    def _finish_pending(self, out: list[StreamEvent]) -> None:
        if self._mode == "rest":
            self._finish_rest(out)
        elif self._mode == "block":  # the output ended inside a block: no closing tag
            self._resolve_block(self._buffer[len(TOOL_CALL_OPEN):], self._buffer, "", out)

    def _finish_rest(self, out: list[StreamEvent]) -> None:
        marker = self._rest_marker
        value = _json_value(self._buffer[len(marker):], lenient=bool(marker))
        calls = _calls(value, self._names, bare=not marker)
        if calls:
            self._held = self._buffer = ""
            self._found(calls, out)
            return
        if marker:  # not a call after all: plain text
            self._mode = "text"
            return
        # not a bare call: read it again as text that may still hold tagged calls
        self._mode, text, self._buffer = "text", self._buffer, ""
        out.extend(self.feed(text))
        self._finish_pending(out)
