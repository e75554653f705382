"""Grammars for structured output and forced tool calls, checked with llguidance (the
engine's library; the gateway itself never imports it)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from meshllm.common.toolcalls import parse_tool_calls
from meshllm.common.types import Grammar, GrammarKind
from meshllm.gateway.errors import ApiError
from meshllm.gateway.structured import (
    FunctionTool,
    ToolChoice,
    check_schema,
    closed,
    output_grammar,
    response_format_schema,
    tool_call_grammar,
)

llguidance = pytest.importorskip("llguidance")
TOKENIZER = llguidance.LLTokenizer("byte")

WEATHER = FunctionTool("get_weather", "", {
    "type": "object", "properties": {"city": {"type": "string"},
                                     "unit": {"enum": ["C", "F"]}},
    "required": ["city"]})
ORDER = FunctionTool("order", "", {  # its own $defs, referenced from inside
    "type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}}, "required": ["item"],
    "$defs": {"Item": {"type": "object", "properties": {"n": {"type": "integer",
                                                             "minimum": 1}},
                       "required": ["n"]}}})
CALL_W = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_O = '<tool_call>\n{"name": "order", "arguments": {"item": {"n": 2}}}\n</tool_call>'


def _accepts(grammar: Grammar, text: str) -> bool:
    if grammar.kind == GrammarKind.LARK:
        source = llguidance.LLMatcher.grammar_from_lark(grammar.source)
    else:
        source = llguidance.LLMatcher.grammar_from_json_schema(grammar.source)
    assert llguidance.LLMatcher.validate_grammar(source, TOKENIZER) == ""
    matcher = llguidance.LLMatcher(TOKENIZER, source, log_level=0)
    return bool(matcher.consume_tokens(TOKENIZER.tokenize_str(text))
                and matcher.is_accepting())


@pytest.mark.parametrize(("parallel", "text", "accepted"), [
    (False, CALL_W, True),
    (False, CALL_O, True),
    (False, CALL_W + "\n" + CALL_O, False),
    (True, CALL_W + "\n" + CALL_O, True),
    (True, "Sure! " + CALL_W, False),
    (True, CALL_W.replace('"Paris"', "3"), False),
    (True, CALL_O.replace('"n": 2', '"n": 0'), False),
    (True, CALL_W.replace("get_weather", "get_time"), False),
    (True, CALL_W.replace('"name": "get_weather", ', ""), False),
    (True, CALL_W.replace(', "arguments"', ',  "arguments"'), False),  # compact only
], ids=["one", "one with $refs", "two without parallel", "two in parallel", "text first",
        "wrong argument type", "out of bounds", "unknown tool", "no name", "loose layout"])
def test_required_call_grammar(parallel: bool, text: str, accepted: bool) -> None:
    assert _accepts(tool_call_grammar([WEATHER, ORDER], parallel), text) is accepted


def test_what_the_grammar_allows_reads_back_as_calls() -> None:
    _, calls = parse_tool_calls(CALL_W + "\n" + CALL_O, {"get_weather", "order"})
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("order", {"item": {"n": 2}})]


def test_auto_with_a_response_format_allows_calls_or_the_answer() -> None:
    answer = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"]}
    grammar = output_grammar([WEATHER], ToolChoice("auto"), True, answer)
    assert grammar is not None
    assert _accepts(grammar, CALL_W) and _accepts(grammar, '{"city": "Rome"}')
    assert not _accepts(grammar, "Rome")


@pytest.mark.parametrize(("choice", "answer", "kind"), [
    (ToolChoice("none"), None, None),
    (ToolChoice("none"), {"type": "object"}, GrammarKind.JSON_SCHEMA),
    (ToolChoice("auto"), None, None),
    (ToolChoice("required"), None, GrammarKind.LARK),
    (ToolChoice("function", "order"), {"type": "object"}, GrammarKind.LARK),
])
def test_which_grammar(choice: ToolChoice, answer: dict[str, Any] | None,
                       kind: GrammarKind | None) -> None:
    grammar = output_grammar([WEATHER, ORDER], choice, True, answer)
    assert (grammar.kind if grammar else None) == kind


@pytest.mark.parametrize("parallel", [False, True])
def test_named_tool_grammar_allows_one_call_to_it(parallel: bool) -> None:
    grammar = output_grammar([WEATHER, ORDER], ToolChoice("function", "order"), parallel, None)
    assert grammar is not None
    assert _accepts(grammar, CALL_O) and not _accepts(grammar, CALL_W)
    assert not _accepts(grammar, CALL_O + "\n" + CALL_O)


def test_json_schema_grammar_is_the_schema() -> None:
    schema = response_format_schema({"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "array", "items": {"type": "integer"},
                                "maxItems": 2}}})
    grammar = output_grammar([], ToolChoice("none"), True, schema)
    assert grammar is not None
    assert _accepts(grammar, "[1, 2]") and not _accepts(grammar, "[1, 2, 3]")


@pytest.mark.parametrize("schema", [
    {"type": "objekt"}, {"properties": {"a": {"type": 3}}}, {"required": "a"},
    {"enum": "abc"}, {"minimum": "1"},
])
def test_invalid_schemas_are_400(schema: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as info:
        check_schema(schema, "response_format.json_schema.schema")
    assert info.value.status == 400
    assert info.value.param == "response_format.json_schema.schema"
    assert "not a valid JSON schema" in info.value.message


@pytest.mark.parametrize(("schema", "expected"), [
    ({"type": "object", "properties": {"a": {"type": "integer"}}},
     {"type": "object", "properties": {"a": {"type": "integer"}},
      "additionalProperties": False}),
    ({"type": "object", "properties": {}, "additionalProperties": True},
     {"type": "object", "properties": {}, "additionalProperties": True}),
    ({"type": "object"}, {"type": "object"}),  # json_object: any object stays allowed
    ({"type": "array", "items": {"properties": {"b": {"type": "string"}}}},
     {"type": "array", "items": {"properties": {"b": {"type": "string"}},
                                 "additionalProperties": False}}),
    ({"anyOf": [{"properties": {}}, {"type": "null"}]},
     {"anyOf": [{"properties": {}, "additionalProperties": False}, {"type": "null"}]}),
], ids=["closed", "explicitly open", "no properties", "nested in items", "inside anyOf"])
def test_objects_with_properties_are_closed(schema: dict[str, Any],
                                            expected: dict[str, Any]) -> None:
    assert closed(schema) == expected


def test_a_closed_schema_refuses_invented_keys() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    grammar = output_grammar([], ToolChoice("none"), True, schema)
    assert grammar is not None
    assert _accepts(grammar, '{"city": "Paris"}')
    assert not _accepts(grammar, '{"city": "Paris", "humidity": 10}')
