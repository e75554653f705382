"""The Responses API: requests validated into chat requests (pure functions), and answers
and streams built through the real app with a scripted backend (no worker), checked
against OpenAI's published schemas where the checkout has them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from meshllm.common.types import (
    ChatMessage,
    Finished,
    GenerateEvent,
    GrammarKind,
    TokenDelta,
    ToolCall,
    Usage,
)
from meshllm.gateway.app import Api, build_app
from meshllm.gateway.errors import ApiError
from meshllm.gateway.failures import StreamBroken
from meshllm.gateway.metrics import GatewayMetrics
from meshllm.gateway.responses_api import parse_responses
from starlette.testclient import TestClient

from tests.support.openapi import check, check_event
from tests.support.scripted_choices import Script, ScriptedChoices

WEATHER: dict[str, Any] = {
    "type": "function", "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}, "strict": True}
BASE: dict[str, Any] = {"model": "m", "input": "hi"}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _refused(body: dict[str, Any]) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse_responses(body)
    assert caught.value.status == 400
    return caught.value


# Requests

def test_string_input_with_instructions_is_a_system_then_user_turn() -> None:
    req = parse_responses({**BASE, "instructions": "Be brief.", "max_output_tokens": 7,
                           "temperature": 0.5, "top_p": 0.9, "seed": 3})
    assert req.chat.kind == "chat" and req.chat.model == "m" and not req.chat.stream
    assert req.chat.chat == (ChatMessage("system", "Be brief."), ChatMessage("user", "hi"))
    sampling = req.chat.sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.seed) == (
        7, 0.5, 0.9, 3)
    assert req.settings["instructions"] == "Be brief."
    assert req.settings["max_output_tokens"] == 7


def test_items_become_chat_turns_with_calls_and_their_outputs() -> None:
    items = [
        {"role": "developer", "content": "Use tools."},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "Weather "},
                     {"type": "input_text", "text": "in Paris?"}]},
        {"type": "message", "role": "assistant", "status": "completed", "id": "msg_1",
         "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather",
         "arguments": '{"city": "Paris"}', "id": "fc_1", "status": "completed"},
        {"type": "function_call", "call_id": "c2", "name": "get_weather",
         "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "rain"}]},
    ]
    req = parse_responses({**BASE, "input": items})
    assert req.chat.chat == (
        ChatMessage("developer", "Use tools."),
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage("assistant", "Checking.", (
            ToolCall("c1", "get_weather", '{"city": "Paris"}'),
            ToolCall("c2", "get_weather", '{"city": "Rome"}'))),
        ChatMessage("tool", "sunny", tool_call_id="c1", name="get_weather"),
        ChatMessage("tool", "rain", tool_call_id="c2", name="get_weather"),
    )


def test_a_call_without_a_message_before_is_its_own_assistant_turn() -> None:
    items = [{"role": "user", "content": "x"},
             {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}]
    messages = parse_responses({**BASE, "input": items}).chat.chat
    assert messages is not None
    assert messages[1] == ChatMessage("assistant", "", (ToolCall("c1", "f", "{}"),))


def test_function_tools_as_chat_tools() -> None:
    req = parse_responses({**BASE, "tools": [WEATHER]})
    assert req.chat.tool_names == ("get_weather",) and req.chat.grammar is None
    assert json.loads(req.chat.tools_json) == [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": WEATHER["parameters"]}}]
    assert req.settings["tools"] == [WEATHER] and req.settings["tool_choice"] == "auto"


@pytest.mark.parametrize(("choice", "names", "grammar"), [
    ("auto", ("get_weather",), None),
    ("none", (), None),
    ("required", ("get_weather",), GrammarKind.LARK),
    ({"type": "function", "name": "get_weather"}, ("get_weather",), GrammarKind.LARK),
])
def test_tool_choice(choice: Any, names: tuple[str, ...], grammar: GrammarKind | None
                     ) -> None:
    req = parse_responses({**BASE, "tools": [WEATHER], "tool_choice": choice})
    assert req.chat.tool_names == names
    assert (req.chat.grammar.kind if req.chat.grammar else None) == grammar
    assert req.settings["tool_choice"] == choice


def test_json_schema_text_format_is_the_answer_grammar() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    text = {"format": {"type": "json_schema", "name": "answer", "schema": schema,
                       "strict": True}}
    req = parse_responses({**BASE, "text": text})
    assert req.chat.grammar is not None and req.chat.grammar.kind == GrammarKind.JSON_SCHEMA
    assert json.loads(req.chat.grammar.source)["properties"] == schema["properties"]
    assert req.settings["text"] == text
    json_mode = parse_responses({**BASE, "text": {"format": {"type": "json_object"}}})
    assert json_mode.chat.grammar is not None


@pytest.mark.parametrize(("body", "param"), [
    ({"input": []}, "input"),
    ({"input": 3}, "input"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
     "input[0].content[0]"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 1}]},
     "input[0].output"),
    ({"instructions": ["x"]}, "instructions"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{**WEATHER, "name": "bad name"}]}, "tools[0].name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
     "tool_choice.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
    ({"text": {"format": {"type": "grammar"}}}, "text.format.type"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"metadata": {"k": 1}}, "metadata"),
    ({"stream": "yes"}, "stream"),
    ({"model": ""}, "model"),
])
def test_bad_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    assert _refused({**BASE, **body}).param == param


@pytest.mark.parametrize(("field", "value"), [
    ("previous_response_id", "resp_1"), ("store", True), ("background", True),
    ("reasoning", {"effort": "high"}), ("conversation", "conv_1"),
    ("include", ["message.output_text.logprobs"]), ("top_logprobs", 3),
    ("truncation", "auto"), ("prompt", {"id": "p"}), ("max_tool_calls", 2),
])
def test_what_changes_the_answer_and_cannot_be_honoured_is_refused(field: str, value: Any
                                                                   ) -> None:
    error = _refused({**BASE, field: value})
    assert (error.param, error.code) == (field, "unsupported_parameter")
    assert field in error.message


def test_what_changes_nothing_is_accepted() -> None:
    req = parse_responses({**BASE, "store": False, "include": [], "truncation": "disabled",
                           "metadata": {"k": "v"}, "user": "u", "service_tier": "auto",
                           "prompt_cache_key": "k", "parallel_tool_calls": False})
    assert req.settings["metadata"] == {"k": "v"} and req.settings["user"] == "u"
    assert req.settings["parallel_tool_calls"] is False


# Answers and streams, through the app

def _pieces(text: str, size: int = 4) -> list[tuple[int, GenerateEvent] | Exception]:
    return [(0, TokenDelta(text[i:i + size], 1)) for i in range(0, len(text), size)]


def _end(reason: str = "stop") -> tuple[int, GenerateEvent]:
    return 0, Finished(reason, Usage(10, 12, 4))


def _post(script: Script, body: dict[str, Any]) -> Any:
    client = TestClient(build_app(Api(ScriptedChoices(script), GatewayMetrics())))
    r = client.post("/v1/responses", json={**BASE, **body})
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        check("Response", r.json())
        return r.json()
    blocks = [b for b in r.text.split("\n\n") if b]
    events = []
    for block in blocks:
        kind, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {event['type']}"
        check_event(event)
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_text_answer_is_one_message_with_usage() -> None:
    body = _post([*_pieces("Hello there"), _end()], {"instructions": "Be brief."})
    assert body["id"].startswith("resp_") and body["object"] == "response"
    assert body["status"] == "completed" and body["incomplete_details"] is None
    [item] = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    assert item["status"] == "completed" and item["id"].startswith("msg_")
    assert item["content"] == [{"type": "output_text", "text": "Hello there",
                                "annotations": [], "logprobs": []}]
    assert body["usage"] == {"input_tokens": 10, "output_tokens": 12, "total_tokens": 22,
                             "input_tokens_details": {"cached_tokens": 4,
                                                      "cache_write_tokens": 6},
                             "output_tokens_details": {"reasoning_tokens": 0}}
    assert body["instructions"] == "Be brief." and body["tools"] == []


def test_calls_are_function_call_items() -> None:
    text = "Let me see." + CALL + "\n" + CALL.replace("Paris", "Rome")
    body = _post([*_pieces(text), _end()], {"tools": [WEATHER]})
    message, *calls = body["output"]
    assert message["content"][0]["text"] == "Let me see."
    assert [(c["type"], c["name"], json.loads(c["arguments"])["city"]) for c in calls] == [
        ("function_call", "get_weather", "Paris"), ("function_call", "get_weather", "Rome")]
    assert all(c["call_id"].startswith("call_") and c["id"].startswith("fc_") for c in calls)
    assert body["status"] == "completed"


def test_a_cut_answer_is_incomplete() -> None:
    body = _post([*_pieces("Once upon a"), _end("length")], {"max_output_tokens": 3})
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete" and body["max_output_tokens"] == 3


def _types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"].removeprefix("response.") for e in events]


def test_streamed_text_follows_the_documented_sequence() -> None:
    events = _post([*_pieces("Hello there"), _end()], {"stream": True})
    assert _types(events) == [
        "created", "in_progress", "output_item.added", "content_part.added",
        *["output_text.delta"] * 3, "output_text.done", "content_part.done",
        "output_item.done", "completed"]
    assert events[0]["response"]["status"] == "in_progress"
    assert "".join(e.get("delta", "") for e in events) == "Hello there"
    assert events[-4]["text"] == "Hello there"
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["usage"]["output_tokens"] == 12
    assert done["output"] == [events[-2]["item"]]
    check("Response", done)


def test_streamed_calls_are_items_with_their_arguments() -> None:
    text = "Hm." + CALL + CALL.replace("Paris", "Rome")
    events = _post([*_pieces(text, 7), _end()], {"stream": True, "tools": [WEATHER]})
    assert _types(events)[2:] == [
        "output_item.added", "content_part.added", "output_text.delta", "output_text.done",
        "content_part.done", "output_item.done",
        *["output_item.added", "function_call_arguments.delta",
          "function_call_arguments.done", "output_item.done"] * 2,
        "completed"]
    added = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    assert added[1]["type"] == "function_call" and added[1]["arguments"] == ""
    argument_ends = [e for e in events if e["type"].endswith("arguments.done")]
    assert [json.loads(e["arguments"]) for e in argument_ends] == [{"city": "Paris"},
                                                                   {"city": "Rome"}]
    output = events[-1]["response"]["output"]
    assert [i["type"] for i in output] == ["message", "function_call", "function_call"]
    assert output[1]["id"] == argument_ends[0]["item_id"] and output[1]["status"] == (
        "completed")


def test_streamed_cut_answer_ends_incomplete() -> None:
    events = _post([*_pieces("Once"), _end("length")], {"stream": True})
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2]["item"]["status"] == "incomplete"


def test_an_empty_streamed_answer_is_still_a_message() -> None:
    events = _post([_end()], {"stream": True})
    assert _types(events)[2:] == ["output_item.added", "content_part.added",
                                  "output_text.done", "content_part.done",
                                  "output_item.done", "completed"]


def test_a_stream_that_breaks_ends_failed() -> None:
    script = [*_pieces("Hello"), StreamBroken("worker w1 failed after the stream began")]
    events = _post(script, {"stream": True})
    assert events[-1]["type"] == "response.failed"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert "w1" in failed["error"]["message"]
    assert failed["output"][0]["status"] == "incomplete"


def test_errors_before_the_answer_are_http_errors() -> None:
    client = TestClient(build_app(Api(ScriptedChoices([]), GatewayMetrics())))
    r = client.post("/v1/responses", json={**BASE, "previous_response_id": "resp_1"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "previous_response_id"
    r = client.post("/v1/responses", json={**BASE, "stream": True})  # no answer at all
    assert r.status_code == 502 and r.json()["error"]["code"] == "worker_failed"


def test_a_stream_without_a_finish_ends_failed() -> None:
    events = _post(_pieces("Hello"), {"stream": True})
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["code"] == "server_error"


def test_null_means_the_default_as_the_api_describes() -> None:
    nulls = {"stream": None, "temperature": None, "top_p": None, "max_output_tokens": None,
             "instructions": None, "tools": None, "tool_choice": None, "text": None,
             "metadata": None, "parallel_tool_calls": None, "previous_response_id": None,
             "store": None, "reasoning": None, "include": None, "truncation": None}
    assert parse_responses({**BASE, **nulls}) == parse_responses(BASE)
