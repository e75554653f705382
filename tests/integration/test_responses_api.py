"""The Responses API through the real mesh on the real model, with the official client and
the OpenAI Agents SDK's default (Responses) model. gemma3-270m is a base model: these
check structure (forced by tool_choice or a json_schema format where it matters), never
the quality of what it says."""

from __future__ import annotations

import json
from typing import Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.support.mesh import LocalMesh
from tests.support.openapi import check, check_event

pytestmark = pytest.mark.integration

MODEL = "gemma3-270m"
QUESTION = "What is the weather like in Paris today?"
TEXT_TOKENS = 16
JSON_TOKENS = 48
CITY: dict[str, Any] = {
    "type": "object", "properties": {"city": {"enum": ["Paris", "London", "Tokyo"]}},
    "required": ["city"], "additionalProperties": False}
WEATHER_TOOL: Any = {"type": "function", "name": "get_weather", "strict": True,
                     "description": "Get today's weather in a city.", "parameters": CITY}


class Weather(BaseModel):
    city: Literal["Paris", "London", "Tokyo"]
    celsius: int = Field(ge=-40, le=50)
    sunny: bool


WEATHER_SCHEMA = {**Weather.model_json_schema(), "additionalProperties": False}


def _create(client: openai.OpenAI, **kwargs: Any) -> Any:
    """The response, checked as it came over the wire against the published schema."""
    raw = client.responses.with_raw_response.create(model=MODEL, **kwargs)
    check("Response", raw.http_response.json())
    return raw.parse()


def test_text_response(client: openai.OpenAI) -> None:
    r = _create(client, input=QUESTION, max_output_tokens=TEXT_TOKENS, temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.status in ("completed", "incomplete")
    [item] = r.output
    assert item.type == "message" and item.role == "assistant"
    assert item.content[0].type == "output_text" and r.output_text == item.content[0].text
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= TEXT_TOKENS
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_instructions_come_first(client: openai.OpenAI) -> None:
    plain = _create(client, input=QUESTION, max_output_tokens=4, temperature=0)
    told = _create(client, input=QUESTION, instructions="Answer in one word.",
                   max_output_tokens=4, temperature=0)
    assert told.instructions == "Answer in one word." and plain.instructions is None
    assert told.usage.input_tokens > plain.usage.input_tokens  # the system turn counts


def test_max_output_tokens_makes_it_incomplete(client: openai.OpenAI) -> None:
    r = _create(client, input="Tell me a long story.", max_output_tokens=3, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.max_output_tokens == 3


def test_stream_follows_the_documented_sequence(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input=QUESTION, instructions="Be brief.",
                                 max_output_tokens=TEXT_TOKENS, temperature=0) as stream:
        events = list(stream)
    final: Any = events[-1]
    final = final.response  # the client's get_final_response wants it completed
    for event in events:
        check_event(event.model_dump(mode="json", exclude_unset=True))  # as sent
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas and kinds.index("response.output_text.delta") == 4
    assert kinds[4 + len(deltas):] == [
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.completed" if final.status == "completed" else "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in deltas) == final.output_text
    assert final.usage is not None and final.usage.output_tokens > 0


def test_function_tool_round_trip(client: openai.OpenAI) -> None:
    asked: list[Any] = [{"role": "user", "content": QUESTION}]
    r = _create(client, input=asked, tools=[WEATHER_TOOL], tool_choice="required",
                parallel_tool_calls=False, max_output_tokens=JSON_TOKENS, temperature=0)
    calls = [item for item in r.output if item.type == "function_call"]
    assert calls and r.status == "completed", r.output
    call = calls[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), CITY)
    answer = _create(client, input=[*asked, *r.output, {
        "type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}],
        tools=[WEATHER_TOOL], tool_choice="none", max_output_tokens=TEXT_TOKENS,
        temperature=0)
    assert [item.type for item in answer.output] == ["message"]
    before = _create(client, input=asked, tools=[WEATHER_TOOL], tool_choice="none",
                     max_output_tokens=1)
    assert answer.usage.input_tokens > before.usage.input_tokens  # the call, its output


def test_streamed_function_call(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input=QUESTION, tools=[WEATHER_TOOL],
                                 tool_choice={"type": "function", "name": "get_weather"},
                                 parallel_tool_calls=False,
                                 max_output_tokens=JSON_TOKENS, temperature=0) as stream:
        events = list(stream)
        final: Any = stream.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    jsonschema.validate(json.loads(done.arguments), CITY)
    assert [i.type for i in final.output] == ["function_call"]
    assert final.output[0].arguments == done.arguments


def test_json_schema_text_format(client: openai.OpenAI) -> None:
    r = _create(client, input=QUESTION, max_output_tokens=JSON_TOKENS, temperature=0,
                text={"format": {"type": "json_schema", "name": "weather",
                                 "schema": WEATHER_SCHEMA, "strict": True}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), WEATHER_SCHEMA)
    parsed = client.responses.parse(model=MODEL, input=QUESTION, text_format=Weather,
                                    max_output_tokens=JSON_TOKENS, temperature=0)
    assert isinstance(parsed.output_parsed, Weather)


@pytest.mark.parametrize(("extra", "param"), [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]"),
])
def test_bad_requests_are_400s_naming_the_field(client: openai.OpenAI, extra: dict[str, Any],
                                                param: str) -> None:
    body = {"input": QUESTION, **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, **body)
    assert caught.value.param == param


def test_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input=QUESTION)


# --- OpenAI Agents SDK, its default model (the Responses API) ---------------------------------

@pytest.fixture(scope="module")
def run_config(mesh: LocalMesh) -> Any:
    from agents import RunConfig, set_tracing_disabled
    from agents.models.openai_provider import OpenAIProvider

    set_tracing_disabled(True)  # its default exporter would send traces to the internet
    client = openai.AsyncOpenAI(base_url=mesh.base_url + "/v1", api_key="unused",
                                max_retries=0, timeout=120)
    return RunConfig(model_provider=OpenAIProvider(openai_client=client, use_responses=True))


def weather_report(city: Literal["Paris", "London", "Tokyo"]) -> str:
    """Get today's weather in a city."""
    return f"sunny, 21 C in {city}"


async def test_agents_sdk_default_model_runs_a_tool(run_config: Any) -> None:
    from agents import Agent, ModelSettings, Runner, ToolCallItem, function_tool
    from agents.models.openai_responses import OpenAIResponsesModel

    agent = Agent(name="weather", instructions="Use the tool.", model=MODEL,
                  tools=[function_tool(weather_report)], tool_use_behavior="stop_on_first_tool",
                  model_settings=ModelSettings(max_tokens=JSON_TOKENS, temperature=0,
                                               tool_choice="required",
                                               parallel_tool_calls=False))
    assert isinstance(run_config.model_provider.get_model(MODEL), OpenAIResponsesModel)
    result = await Runner.run(agent, QUESTION, run_config=run_config)
    calls = [item.raw_item for item in result.new_items if isinstance(item, ToolCallItem)]
    call: Any = calls[0]
    assert call.name == "weather_report"
    city = json.loads(call.arguments)["city"]
    assert result.final_output == weather_report(city)


async def test_agents_sdk_default_model_output_type_and_stream(run_config: Any) -> None:
    from agents import Agent, ModelSettings, Runner
    from openai.types.responses import ResponseTextDeltaEvent

    # A structured answer, so that it ends by itself: the SDK fails a run whose
    # response is incomplete, and a base model's free text rarely stops in time.
    agent = Agent(name="weather", instructions="Report the weather.", model=MODEL,
                  output_type=Weather,
                  model_settings=ModelSettings(max_tokens=JSON_TOKENS, temperature=0))
    result = await Runner.run(agent, QUESTION, run_config=run_config)
    assert isinstance(result.final_output, Weather)
    streamed = Runner.run_streamed(agent, QUESTION, run_config=run_config)
    deltas = [e.data.delta async for e in streamed.stream_events()
              if e.type == "raw_response_event" and isinstance(e.data, ResponseTextDeltaEvent)]
    assert Weather.model_validate_json("".join(deltas)) == streamed.final_output
    assert streamed.final_output == result.final_output
