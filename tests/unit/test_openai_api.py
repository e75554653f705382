"""Validation of OpenAI request bodies: table-driven good and bad inputs."""

from __future__ import annotations

import json
from typing import Any

import pytest
from meshllm.common.types import ChatMessage, Grammar, GrammarKind, ToolCall
from meshllm.gateway.errors import ApiError
from meshllm.gateway.openai_api import parse_chat, parse_completion, parse_json

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_chat_defaults() -> None:
    req = parse_chat(CHAT)
    assert req.chat == (ChatMessage("user", "hi"),)
    assert (req.sampling.temperature, req.sampling.top_p, req.sampling.max_tokens) == (1.0, 1.0, 0)
    assert not req.stream and not req.include_usage


def test_chat_full() -> None:
    req = parse_chat({**CHAT, "max_tokens": 5, "temperature": 0, "top_p": 0.5, "seed": -1,
                      "stop": "\n", "stream": True, "stream_options": {"include_usage": True},
                      "messages": [{"role": "system", "content": "s"},
                                   {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                {"type": "text", "text": "b"}]}]})
    assert req.sampling.max_tokens == 5 and req.sampling.temperature == 0.0
    assert req.sampling.seed == 2**64 - 1 and req.sampling.stop == ("\n",)
    assert req.chat == (ChatMessage("system", "s"), ChatMessage("user", "ab"))
    assert req.stream and req.include_usage


def test_null_means_the_default_as_the_api_describes() -> None:
    nulls = {"stream": None, "temperature": None, "top_p": None, "max_tokens": None,
             "n": None, "stop": None, "seed": None, "logprobs": None, "top_logprobs": None,
             "stream_options": None, "response_format": None, "tools": None}
    assert parse_chat({**CHAT, **nulls}) == parse_chat(CHAT)
    assert parse_completion({"model": "m", "prompt": "p", **nulls}) == parse_completion(
        {"model": "m", "prompt": "p"})


def test_max_completion_tokens_wins() -> None:
    req = parse_chat({**CHAT, "max_completion_tokens": 3, "max_tokens": 9})
    assert req.sampling.max_tokens == 3


def test_completion_prompt_forms() -> None:
    assert parse_completion({"model": "m", "prompt": "x"}).text == "x"
    assert parse_completion({"model": "m", "prompt": ["y"]}).text == "y"


BAD_CHAT: list[tuple[str, dict[str, Any], str | None]] = [
    ("no model", {"messages": CHAT["messages"]}, "model"),
    ("model not a string", {**CHAT, "model": 3}, "model"),
    ("no messages", {"model": "m"}, "messages"),
    ("empty messages", {"model": "m", "messages": []}, "messages"),
    ("bad role", {"model": "m", "messages": [{"role": "robot", "content": "x"}]},
     "messages[0].role"),
    ("image part", {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content"),
    ("temperature too high", {**CHAT, "temperature": 3}, "temperature"),
    ("temperature as string", {**CHAT, "temperature": "hot"}, "temperature"),
    ("top_p above 1", {**CHAT, "top_p": 1.5}, "top_p"),
    ("max_tokens zero", {**CHAT, "max_tokens": 0}, "max_tokens"),
    ("max_tokens float", {**CHAT, "max_tokens": 1.5}, "max_tokens"),
    ("max_tokens bool", {**CHAT, "max_tokens": True}, "max_tokens"),
    ("too many stops", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("empty stop", {**CHAT, "stop": [""]}, "stop"),
    ("stream not bool", {**CHAT, "stream": "yes"}, "stream"),
    ("stream_options without stream", {**CHAT, "stream_options": {"include_usage": True}},
     "stream_options"),
    ("n above 16", {**CHAT, "n": 17}, "n"),
    ("n zero", {**CHAT, "n": 0}, "n"),
    ("tool without function", {**CHAT, "tools": [{"type": "function"}]}, "tools[0].function"),
    ("legacy functions", {**CHAT, "functions": [{"name": "f"}]}, "functions"),
    ("legacy function_call", {**CHAT, "function_call": "auto"}, "function_call"),
    ("seed float", {**CHAT, "seed": 1.5}, "seed"),
]


@pytest.mark.parametrize(("body", "param"), [c[1:] for c in BAD_CHAT],
                         ids=[c[0] for c in BAD_CHAT])
def test_bad_chat_is_400_naming_the_param(body: dict[str, Any], param: str | None) -> None:
    with pytest.raises(ApiError) as info:
        parse_chat(body)
    assert info.value.status == 400
    assert info.value.param == param
    assert info.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body", [
    {"model": "m"}, {"model": "m", "prompt": [1, 2]}, {"model": "m", "prompt": ["a", "b"]},
    {"model": "m", "prompt": "x", "echo": True},
])
def test_bad_completion(body: dict[str, Any]) -> None:
    with pytest.raises(ApiError):
        parse_completion(body)


@pytest.mark.parametrize("raw", [b"{bad", b"[1]", b"\xff", b""])
def test_bad_json(raw: bytes) -> None:
    with pytest.raises(ApiError) as info:
        parse_json(raw)
    assert info.value.status == 400


TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TOOLS = {**CHAT, "tools": [TOOL, {"type": "function", "function": {"name": "get_time"}}]}
ROUND_TRIP = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
]

BAD_AGENT: list[tuple[str, dict[str, Any], str | None]] = [
    ("tool of another type", {**CHAT, "tools": [{"type": "custom", "custom": {}}]},
     "tools[0].type"),
    ("tool name with a space", {**CHAT, "tools": [
        TOOL, {"type": "function", "function": {"name": "get time"}}]},
     "tools[1].function.name"),
    ("tool name too long", {**CHAT, "tools": [
        {"type": "function", "function": {"name": "f" * 65}}]}, "tools[0].function.name"),
    ("tool name twice", {**CHAT, "tools": [TOOL, TOOL]}, "tools[1].function.name"),
    ("parameters not an object schema", {**CHAT, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ("parameters not a valid schema", {**CHAT, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "integr"}}}}}]},
     "tools[0].function.parameters"),
    ("tools not a list", {**CHAT, "tools": {"f": 1}}, "tools"),
    ("unknown tool in tool_choice", {**TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ("bad tool_choice string", {**TOOLS, "tool_choice": "always"}, "tool_choice"),
    ("tool_choice without tools", {**CHAT, "tool_choice": "required"}, "tool_choice"),
    ("parallel_tool_calls not bool", {**TOOLS, "parallel_tool_calls": "yes"},
     "parallel_tool_calls"),
    ("tool message without its call id", {**CHAT, "messages": [
        {"role": "tool", "content": "18C"}]}, "messages[0].tool_call_id"),
    ("assistant call without a name", {**CHAT, "messages": [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"arguments": "{}"}}]}]},
     "messages[0].tool_calls[0].function.name"),
    ("user turn with tool_calls", {**CHAT, "messages": [
        {"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    ("assistant content null without calls", {**CHAT, "messages": [
        {"role": "assistant", "content": None}]}, "messages[0].content"),
    ("response_format of unknown type", {**CHAT, "response_format": {"type": "xml"}},
     "response_format.type"),
    ("json_schema without its object", {**CHAT, "response_format": {"type": "json_schema"}},
     "response_format.json_schema"),
    ("json_schema with a bad name", {**CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name"),
    ("invalid schema", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"minLength": -1}}}}}},
     "response_format.json_schema.schema"),
    ("schema not an object", {**CHAT, "response_format": {"type": "json_schema",
                                                          "json_schema": {"name": "x",
                                                                          "schema": [1]}}},
     "response_format.json_schema.schema"),
    ("logprobs not bool", {**CHAT, "logprobs": 3}, "logprobs"),
    ("top_logprobs above 20", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("top_logprobs without logprobs", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("logit_bias key not a token id", {**CHAT, "logit_bias": {"hello": 1}}, "logit_bias"),
    ("logit_bias above 100", {**CHAT, "logit_bias": {"5": 101}}, "logit_bias"),
    ("logit_bias not an object", {**CHAT, "logit_bias": [1]}, "logit_bias"),
    ("min_p above 1", {**CHAT, "min_p": 1.5}, "min_p"),
    ("top_k not an integer", {**CHAT, "top_k": 2.5}, "top_k"),
    ("repeat_penalty zero", {**CHAT, "repeat_penalty": 0}, "repeat_penalty"),
]


@pytest.mark.parametrize(("body", "param"), [c[1:] for c in BAD_AGENT],
                         ids=[c[0] for c in BAD_AGENT])
def test_bad_agent_input_is_400_naming_the_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_chat(body)
    assert (info.value.status, info.value.param) == (400, param)
    assert info.value.body()["error"]["type"] == "invalid_request_error"


def test_sampling_extensions() -> None:
    req = parse_chat({**CHAT, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1,
                      "logit_bias": {"17": -100, "3": 2.5}})
    s = req.sampling
    assert (s.top_k, s.min_p, s.repeat_penalty) == (40, 0.05, 1.1)
    assert s.logit_bias == ((3, 2.5), (17, -100.0))
    assert parse_chat({**CHAT, "top_k": -1, "repetition_penalty": 1.3}).sampling.top_k == 0
    assert parse_chat({**CHAT, "repetition_penalty": 1.3}).sampling.repeat_penalty == 1.3


def test_logprobs_and_n() -> None:
    assert parse_chat(CHAT).logprobs is None
    assert parse_chat({**CHAT, "logprobs": True}).logprobs == 0
    assert parse_chat({**CHAT, "logprobs": True, "top_logprobs": 5}).logprobs == 5
    assert parse_chat({**CHAT, "logprobs": False, "top_logprobs": None}).logprobs is None
    assert parse_completion({"model": "m", "prompt": "x", "logprobs": 3}).logprobs == 3
    assert parse_completion({"model": "m", "prompt": "x", "logprobs": 20}).logprobs == 20
    with pytest.raises(ApiError):
        parse_completion({"model": "m", "prompt": "x", "logprobs": 21})
    assert parse_chat({**CHAT, "n": 3}).n == 3 and parse_chat(CHAT).n == 1


def test_response_formats() -> None:
    assert parse_chat({**CHAT, "response_format": {"type": "text"}}).grammar is None
    json_object = parse_chat({**CHAT, "response_format": {"type": "json_object"}}).grammar
    assert json_object == Grammar(GrammarKind.JSON_SCHEMA, '{"type": "object"}')
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}
    grammar = parse_chat({**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "count", "schema": schema, "strict": True}}}).grammar
    assert grammar is not None and grammar.kind == GrammarKind.JSON_SCHEMA
    assert json.loads(grammar.source) == {**schema, "additionalProperties": False}  # closed


def test_tools_auto_by_default_and_none_hides_them() -> None:
    auto = parse_chat(TOOLS)
    assert auto.grammar is None and auto.tool_names == ("get_weather", "get_time")
    sent = json.loads(auto.tools_json)
    assert sent[0] == TOOL
    assert sent[1] == {"type": "function", "function": {
        "name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    hidden = parse_chat({**TOOLS, "tool_choice": "none"})
    assert (hidden.tools_json, hidden.tool_names, hidden.grammar) == ("", (), None)


def test_required_and_named_tools_are_grammars() -> None:
    required = parse_chat({**TOOLS, "tool_choice": "required"})
    assert required.grammar is not None and required.grammar.kind == GrammarKind.LARK
    assert '"get_weather"' in required.grammar.source and '"get_time"' in required.grammar.source
    named = parse_chat({**TOOLS, "tool_choice": {"type": "function",
                                                 "function": {"name": "get_time"}}})
    assert named.grammar is not None and '"get_weather"' not in named.grammar.source
    assert named.tools_json == required.tools_json  # the model still sees every tool


def test_tool_round_trip_messages() -> None:
    req = parse_chat({**TOOLS, "messages": ROUND_TRIP})
    assert req.chat == (
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage("assistant", "", (ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)),
        ChatMessage("tool", "18C", tool_call_id="call_1", name="get_weather"))


def test_parallel_calls_shape_the_grammar() -> None:
    one = parse_chat({**TOOLS, "tool_choice": "required", "parallel_tool_calls": False})
    many = parse_chat({**TOOLS, "tool_choice": "required"})
    assert one.grammar is not None and many.grammar is not None
    assert "{0,15}" in many.grammar.source and "{0,15}" not in one.grammar.source
    assert not one.parallel_tool_calls and many.parallel_tool_calls
