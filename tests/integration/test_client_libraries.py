"""The client libraries agents use, each called as its own docs show, with base_url set to the
real mesh (gateway, workers running llama.cpp on gemma3-270m).

gemma3-270m is a small base model: these tests check shapes, not answers. Structured output and
tool calls get their shape from constrained decoding (response_format json_schema, tool_choice
required or named), so they validate whatever the model is; free text is only checked for type.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from types import ModuleType
from typing import Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.support.mesh import LocalMesh

pytestmark = pytest.mark.integration

MODEL = "gemma3-270m"
QUESTION = "What is the weather like in Paris today?"
TEXT_TOKENS = 16
JSON_TOKENS = 48     # a Weather object is about 20 tokens
TIMEOUT_S = 120


class Weather(BaseModel):
    """Every field is bounded (enum, integer range, boolean) so the object always fits in
    JSON_TOKENS, whatever a base model would ramble."""

    city: Literal["Paris", "London", "Tokyo"]
    celsius: int = Field(ge=-40, le=50)
    sunny: bool


WEATHER_SCHEMA = Weather.model_json_schema()
# What OpenAI's strict mode requires of a hand-written schema (pydantic's leaves it open).
WEATHER_STRICT_SCHEMA = {**WEATHER_SCHEMA, "additionalProperties": False}
GET_WEATHER_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]}},
    "required": ["city"],
    "additionalProperties": False,
}
GET_WEATHER_TOOL: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "Get today's weather in a city.",
    "parameters": GET_WEATHER_PARAMS}}


def weather_report(city: Literal["Paris", "London", "Tokyo"]) -> str:
    """Get today's weather in a city."""
    return f"sunny, 21 C in {city}"


def assert_valid(arguments: str | dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    value = json.loads(arguments) if isinstance(arguments, str) else arguments
    assert isinstance(value, dict), arguments
    jsonschema.validate(value, schema)
    return value


@pytest.fixture(scope="module")
def base_url(mesh: LocalMesh) -> str:
    return mesh.base_url + "/v1"


# --- openai (official) ---------------------------------------------------------------------------

def test_openai_text_and_stream(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model=MODEL, messages=messages,
                                           max_tokens=TEXT_TOKENS, temperature=0)
    assert isinstance(whole.choices[0].message.content, str) and whole.choices[0].message.content
    stream = client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                            max_tokens=TEXT_TOKENS, temperature=0)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_openai_parse_structured_output(client: openai.OpenAI) -> None:
    r = client.chat.completions.parse(model=MODEL, response_format=Weather, temperature=0,
                                      max_tokens=JSON_TOKENS,
                                      messages=[{"role": "user", "content": QUESTION}])
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Weather)
    assert message.content is not None
    assert_valid(message.content, WEATHER_SCHEMA)


def test_openai_tool_call_required(client: openai.OpenAI) -> None:
    # One call: with parallel calls allowed, a base model calls again and again until
    # max_tokens (the README's tool-calling section says so).
    r = client.chat.completions.create(model=MODEL, tools=[GET_WEATHER_TOOL],
                                       tool_choice="required", max_tokens=JSON_TOKENS,
                                       parallel_tool_calls=False,
                                       temperature=0,
                                       messages=[{"role": "user", "content": QUESTION}])
    assert r.choices[0].finish_reason == "tool_calls"
    assert not r.choices[0].message.content  # a forced call leaves no text
    calls = r.choices[0].message.tool_calls
    assert calls, r.choices[0].message
    call = calls[0]
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    assert_valid(call.function.arguments, GET_WEATHER_PARAMS)


def test_openai_pydantic_function_tool_named(client: openai.OpenAI) -> None:
    tool = openai.pydantic_function_tool(Weather, name="report_weather")
    r = client.chat.completions.parse(
        model=MODEL, tools=[tool], max_tokens=JSON_TOKENS, temperature=0,
        tool_choice={"type": "function", "function": {"name": "report_weather"}},
        messages=[{"role": "user", "content": QUESTION}])
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "report_weather"
    assert isinstance(calls[0].function.parsed_arguments, Weather)


# --- LangChain -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_model(base_url: str) -> Any:
    from langchain_openai import ChatOpenAI

    # As its docs show; mypy sees only the pydantic fields' aliases and SecretStr types.
    return ChatOpenAI(base_url=base_url, api_key="unused",  # type: ignore[call-arg, arg-type]
                      model=MODEL, max_tokens=JSON_TOKENS, temperature=0, max_retries=0,
                      timeout=TIMEOUT_S)


def test_langchain_invoke_and_stream(chat_model: Any) -> None:
    from langchain_core.messages import AIMessage, AIMessageChunk

    model = chat_model.bind(max_tokens=TEXT_TOKENS)
    reply = model.invoke(QUESTION)
    assert isinstance(reply, AIMessage) and isinstance(reply.content, str) and reply.content
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
    chunks = list(model.stream(QUESTION))
    assert chunks and all(isinstance(c, AIMessageChunk) for c in chunks)
    assert "".join(str(c.content) for c in chunks) == reply.content


def test_langchain_structured_output(chat_model: Any) -> None:
    structured = chat_model.with_structured_output(Weather, method="json_schema",
                                                   include_raw=True)
    out = structured.invoke(QUESTION)
    assert out["parsing_error"] is None
    assert isinstance(out["parsed"], Weather)
    assert_valid(out["raw"].content, WEATHER_SCHEMA)


@pytest.mark.parametrize("tool_choice", ["required", "weather_report"])
def test_langchain_bind_tools(chat_model: Any, tool_choice: str) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_core.utils.function_calling import convert_to_openai_tool

    weather_tool = tool(weather_report)
    reply = chat_model.bind_tools([weather_tool], tool_choice=tool_choice).invoke(QUESTION)
    assert len(reply.tool_calls) >= 1, reply
    call = reply.tool_calls[0]
    assert call["name"] == "weather_report" and call["id"]
    assert_valid(call["args"], convert_to_openai_tool(weather_tool)["function"]["parameters"])
    # The round trip: the tool's answer goes back in the history as a tool message.
    result = weather_tool.invoke(call)
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
    follow_up = chat_model.bind(max_tokens=TEXT_TOKENS).invoke(
        [HumanMessage(QUESTION), reply, result])
    assert isinstance(follow_up.content, str)
    assert follow_up.response_metadata["finish_reason"] in ("stop", "length")


# --- OpenAI Agents SDK (chat completions model; the Responses one comes with part 2) ------------

@pytest.fixture(scope="module")
def agents_model(base_url: str) -> Any:
    from agents import OpenAIChatCompletionsModel, set_tracing_disabled

    set_tracing_disabled(True)  # its default exporter would send traces to the internet
    return OpenAIChatCompletionsModel(model=MODEL, openai_client=openai.AsyncOpenAI(
        base_url=base_url, api_key="unused", max_retries=0, timeout=TIMEOUT_S))


async def test_agents_sdk_text_and_stream(agents_model: Any) -> None:
    from agents import Agent, ModelSettings, Runner
    from openai.types.responses import ResponseTextDeltaEvent

    agent = Agent(name="assistant", instructions="Answer briefly.", model=agents_model,
                  model_settings=ModelSettings(max_tokens=TEXT_TOKENS, temperature=0))
    result = await Runner.run(agent, QUESTION)
    assert isinstance(result.final_output, str) and result.final_output
    assert len(result.raw_responses) == 1
    streamed = Runner.run_streamed(agent, QUESTION)
    deltas = [e.data.delta async for e in streamed.stream_events()
              if e.type == "raw_response_event" and isinstance(e.data, ResponseTextDeltaEvent)]
    assert deltas and "".join(deltas) == streamed.final_output == result.final_output


async def test_agents_sdk_output_type(agents_model: Any) -> None:
    from agents import Agent, ModelSettings, Runner

    agent = Agent(name="weather", instructions="Report the weather.", model=agents_model,
                  output_type=Weather,
                  model_settings=ModelSettings(max_tokens=JSON_TOKENS, temperature=0))
    result = await Runner.run(agent, QUESTION)
    assert isinstance(result.final_output, Weather)


async def test_agents_sdk_function_tool(agents_model: Any) -> None:
    from agents import Agent, ModelSettings, Runner, ToolCallItem, function_tool

    agent = Agent(name="weather", instructions="Use the tool.", model=agents_model,
                  tools=[function_tool(weather_report)], tool_use_behavior="stop_on_first_tool",
                  model_settings=ModelSettings(max_tokens=JSON_TOKENS, temperature=0,
                                               tool_choice="required"))
    result = await Runner.run(agent, QUESTION)
    calls = [item.raw_item for item in result.new_items if isinstance(item, ToolCallItem)]
    assert len(calls) >= 1
    call: Any = calls[0]
    assert call.name == "weather_report"
    args = assert_valid(call.arguments, GET_WEATHER_PARAMS)
    assert result.final_output == weather_report(args["city"])


# --- Instructor ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode_name", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_response_model(base_url: str, mode_name: str) -> None:
    import instructor

    mode = instructor.Mode[mode_name]
    client = instructor.from_openai(openai.OpenAI(base_url=base_url, api_key="unused",
                                                  max_retries=0, timeout=TIMEOUT_S), mode=mode)
    weather, completion = client.chat.completions.create_with_completion(
        model=MODEL, response_model=Weather, max_tokens=JSON_TOKENS, temperature=0,
        max_retries=0, messages=[{"role": "user", "content": QUESTION}])
    assert isinstance(weather, Weather)
    message = completion.choices[0].message
    if mode is instructor.Mode.TOOLS:  # a named tool_choice
        assert message.tool_calls and message.tool_calls[0].function.name == "Weather"
        assert_valid(message.tool_calls[0].function.arguments, WEATHER_SCHEMA)
    else:                               # response_format json_schema
        assert message.content is not None
        assert_valid(message.content, WEATHER_SCHEMA)


def test_instructor_partial_stream(base_url: str) -> None:
    import instructor

    client = instructor.from_openai(openai.OpenAI(base_url=base_url, api_key="unused",
                                                  max_retries=0, timeout=TIMEOUT_S),
                                    mode=instructor.Mode.JSON_SCHEMA)
    partials = list(client.chat.completions.create_partial(
        model=MODEL, response_model=Weather, max_tokens=JSON_TOKENS, temperature=0,
        max_retries=0, messages=[{"role": "user", "content": QUESTION}]))
    assert len(partials) > 1  # it arrived in pieces
    assert Weather.model_validate(partials[-1].model_dump())


# --- Pydantic AI ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pydantic_ai_model(base_url: str) -> Any:
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    return OpenAIChatModel(MODEL, provider=OpenAIProvider(base_url=base_url, api_key="unused"))


async def test_pydantic_ai_text_and_stream(pydantic_ai_model: Any) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.settings import ModelSettings

    agent = Agent(pydantic_ai_model, instructions="Answer briefly.")
    settings = ModelSettings(max_tokens=TEXT_TOKENS, temperature=0)
    result = await agent.run(QUESTION, model_settings=settings)
    assert isinstance(result.output, str) and result.output
    assert 0 < result.usage.output_tokens <= TEXT_TOKENS
    async with agent.run_stream(QUESTION, model_settings=settings) as streamed:
        deltas = [d async for d in streamed.stream_text(delta=True)]
    assert deltas and "".join(deltas) == result.output


@pytest.mark.parametrize("native", [False, True], ids=["tool-output", "native-output"])
async def test_pydantic_ai_output_type(pydantic_ai_model: Any, native: bool) -> None:
    from pydantic_ai import Agent, NativeOutput
    from pydantic_ai.settings import ModelSettings

    # Default (tool output) sends a final_result tool with tool_choice required;
    # NativeOutput sends response_format json_schema.
    output_type: Any = NativeOutput(Weather) if native else Weather
    agent = Agent(pydantic_ai_model, output_type=output_type, instructions="Report the weather.")
    result = await agent.run(QUESTION, model_settings=ModelSettings(max_tokens=JSON_TOKENS,
                                                                    temperature=0))
    assert isinstance(result.output, Weather)
    assert len(result.all_messages()) == (2 if native else 3)  # no retry was needed


# --- LiteLLM -------------------------------------------------------------------------------------

@pytest.fixture
def litellm(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    # Set before the first import: its price list is otherwise fetched from the internet.
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    yield importlib.import_module("litellm")


def _litellm_call(litellm: ModuleType, base_url: str, **kwargs: Any) -> Any:
    return litellm.completion(model=f"openai/{MODEL}", api_base=base_url, api_key="unused",
                              messages=[{"role": "user", "content": QUESTION}], temperature=0,
                              timeout=TIMEOUT_S, **kwargs)


def test_litellm_text_and_stream(litellm: ModuleType, base_url: str) -> None:
    whole = _litellm_call(litellm, base_url, max_tokens=TEXT_TOKENS)
    text = whole.choices[0].message.content
    assert isinstance(text, str) and text
    assert whole.usage.completion_tokens <= TEXT_TOKENS
    chunks = list(_litellm_call(litellm, base_url, max_tokens=TEXT_TOKENS, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_litellm_response_format(litellm: ModuleType, base_url: str) -> None:
    as_dict = _litellm_call(litellm, base_url, max_tokens=JSON_TOKENS, response_format={
        "type": "json_schema",
        "json_schema": {"name": "weather", "schema": WEATHER_STRICT_SCHEMA, "strict": True}})
    assert_valid(as_dict.choices[0].message.content, WEATHER_STRICT_SCHEMA)
    as_model = _litellm_call(litellm, base_url, max_tokens=JSON_TOKENS, response_format=Weather)
    assert Weather.model_validate_json(as_model.choices[0].message.content)


def test_litellm_tools(litellm: ModuleType, base_url: str) -> None:
    r = _litellm_call(litellm, base_url, max_tokens=JSON_TOKENS, tools=[GET_WEATHER_TOOL],
                      tool_choice="required", parallel_tool_calls=False)  # one call, as above
    assert r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    assert call.id and call.function.name == "get_weather"
    assert_valid(call.function.arguments, GET_WEATHER_PARAMS)
