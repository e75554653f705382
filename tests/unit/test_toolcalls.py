"""Reading tool calls back from model output: whole and piece by piece alike."""

from __future__ import annotations

import json

import pytest
from meshllm.common.toolcalls import (
    CallFound,
    Content,
    ToolCallStream,
    format_tool_call,
    format_tool_response,
    parse_tool_calls,
    tools_instruction,
)
from meshllm.common.types import ToolCall

W = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
W_ARGS = '{"city": "Paris"}'
T = '{"name": "get_time", "arguments": {}}'

# (id, output, content, [(name, arguments)])
CASES: list[tuple[str, str, str, list[tuple[str, str]]]] = [
    ("plain text", "It is sunny.", "It is sunny.", []),
    ("plain text keeps its whitespace", "  a\n\nb \n", "  a\n\nb \n", []),
    ("one call, newlines", f"<tool_call>\n{W}\n</tool_call>", "", [("get_weather", W_ARGS)]),
    ("one call, no newlines", f"<tool_call>{W}</tool_call>", "", [("get_weather", W_ARGS)]),
    ("text then call", f"Let me check.\n<tool_call>\n{W}\n</tool_call>\n", "Let me check.",
     [("get_weather", W_ARGS)]),
    ("two calls", f"<tool_call>\n{W}\n</tool_call>\n<tool_call>\n{T}\n</tool_call>", "",
     [("get_weather", W_ARGS), ("get_time", "{}")]),
    ("missing closing tag at the end", f"<tool_call>\n{W}\n", "", [("get_weather", W_ARGS)]),
    ("missing closing tag between calls", f"<tool_call>\n{W}\n<tool_call>\n{T}</tool_call>",
     "", [("get_weather", W_ARGS), ("get_time", "{}")]),
    ("bare JSON object", f"  {W}\n", "", [("get_weather", W_ARGS)]),
    ("bare JSON list", f"[{W}, {T}]", "", [("get_weather", W_ARGS), ("get_time", "{}")]),
    ("bare JSON in a code fence", f"```json\n{W}\n```", "", [("get_weather", W_ARGS)]),
    ("bare JSON without arguments is no call", '{"name": "Bob"}', '{"name": "Bob"}', []),
    ("JSON answer is no call", '{"city": "Paris"}', '{"city": "Paris"}', []),
    ("arguments as a string", '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}'
     '</tool_call>', "", [("f", '{"x": 1}')]),
    ("parameters instead of arguments", '<tool_call>{"name": "f", "parameters": {"x": 1}}'
     '</tool_call>', "", [("f", '{"x": 1}')]),
    ("OpenAI-shaped call", '<tool_call>{"type": "function", "function": {"name": "f", '
     '"arguments": {"x": 1}}}</tool_call>', "", [("f", '{"x": 1}')]),
    ("no arguments in a tag", '<tool_call>{"name": "f"}</tool_call>', "", [("f", "{}")]),
    ("invalid JSON is text", "<tool_call>{not json}</tool_call>",
     "<tool_call>{not json}</tool_call>", []),
    ("arguments not an object is text", '<tool_call>{"name": "f", "arguments": 3}</tool_call>',
     '<tool_call>{"name": "f", "arguments": 3}</tool_call>', []),
    ("arguments string not JSON", '<tool_call>{"name": "f", "arguments": "x"}</tool_call>',
     '<tool_call>{"name": "f", "arguments": "x"}</tool_call>', []),
    ("invalid block kept with its whitespace", "a\n<tool_call>x</tool_call> b",
     "a\n<tool_call>x</tool_call> b", []),
    ("stray brace after the JSON", f"<tool_call>\n{W}}}\n</tool_call>", "",
     [("get_weather", W_ARGS)]),
    ("text after a call", f"<tool_call>{W}</tool_call>\n\nDone.", "Done.",
     [("get_weather", W_ARGS)]),
    ("partial marker that is text", "a <tool_ b", "a <tool_ b", []),
    ("mistral marker", f"[TOOL_CALLS][{W}]", "", [("get_weather", W_ARGS)]),
    ("llama python tag", '<|python_tag|>{"name": "f", "parameters": {"x": 1}}', "",
     [("f", '{"x": 1}')]),
    ("mistral marker, not JSON", "[TOOL_CALLS] oops", "[TOOL_CALLS] oops", []),
    ("text looking like a list, then a call", f"[1] see <tool_call>{W}</tool_call>",
     "[1] see", [("get_weather", W_ARGS)]),
    ("unicode arguments", '<tool_call>{"name": "f", "arguments": {"c": "Zürich"}}</tool_call>',
     "", [("f", '{"c": "Zürich"}')]),
]


def _expected(calls: list[tuple[str, str]]) -> tuple[ToolCall, ...]:
    return tuple(ToolCall("", name, args) for name, args in calls)


@pytest.mark.parametrize(("output", "content", "calls"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_parse_tool_calls(output: str, content: str, calls: list[tuple[str, str]]) -> None:
    assert parse_tool_calls(output) == (content, _expected(calls))


@pytest.mark.parametrize(("output", "content", "calls"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
@pytest.mark.parametrize("piece", [1, 3, 7])
def test_streaming_reads_the_same(output: str, content: str, calls: list[tuple[str, str]],
                                  piece: int) -> None:
    stream = ToolCallStream()
    events = []
    for i in range(0, len(output), piece):
        events += stream.feed(output[i:i + piece])
    events += stream.finish()
    assert "".join(e.text for e in events if isinstance(e, Content)) == content
    found = [e for e in events if isinstance(e, CallFound)]
    assert [e.index for e in found] == list(range(len(calls)))
    assert tuple(e.call for e in found) == _expected(calls)


def test_stream_sends_text_before_the_call_is_complete() -> None:
    stream = ToolCallStream()
    assert stream.feed("Checking the weather") == [Content("Checking the weather")]
    assert stream.feed(" now.\n<tool_") == [Content(" now.")]
    assert stream.feed('call>{"name": "f", "arguments": {}') == []
    assert stream.feed("}</tool_call>") == [CallFound(0, ToolCall("", "f", "{}"))]
    assert stream.finish() == []


def test_only_known_names_are_calls() -> None:
    text = f"<tool_call>{W}</tool_call>"
    assert parse_tool_calls(text, {"get_weather"})[1]
    assert parse_tool_calls(text, {"other"}) == (text, ())


def test_instruction_shows_the_format_and_the_tools() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    text = tools_instruction(json.dumps(tools))
    assert "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {}}\n</tool_call>" in text
    assert json.dumps(tools[0]) in text


def test_history_formats_read_back() -> None:
    call = ToolCall("call_1", "get_weather", W_ARGS)
    assert parse_tool_calls(format_tool_call(call)) == ("", (ToolCall("", "get_weather",
                                                                      W_ARGS),))
    assert format_tool_response("18C") == "<tool_response>\n18C\n</tool_response>"
