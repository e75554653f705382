"""What agents use, through the real mesh with the official client: structured outputs,
tool calls, logprobs, n choices, sampling extensions, and their bad inputs."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from meshllm.common.models import materialize

pytestmark = pytest.mark.integration

MODEL = "gemma3-270m"
ASK: Any = [{"role": "user", "content": "Describe a person who lives in a city."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 20},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "colour": {"enum": ["red", "green", "blue"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                 "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "additionalProperties": False,
                    "properties": {"city": {"type": "string", "maxLength": 20},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "colour", "score", "tags", "address"],
    "additionalProperties": False,
}
WEATHER: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False,
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME: Any = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string",
                                                             "maxLength": 30}},
                   "required": ["zone"]}}}
TOOLS = [WEATHER, TIME]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
WEATHER_ASK: Any = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def _json_schema(schema: dict[str, Any], name: str = "answer") -> Any:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                   "strict": True}}


def _check_call(name: str, arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), PARAMETERS[name])


# Structured outputs

def test_json_schema_output_validates(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0,
                                       max_tokens=300, response_format=_json_schema(PERSON))
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content or ""), PERSON)


def test_streamed_json_schema_output_validates(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=0.8, seed=3, max_tokens=300, stream=True,
        response_format=_json_schema(PERSON)))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_json_schema_on_completions(client: openai.OpenAI) -> None:
    schema = {"type": "array", "items": {"enum": ["red", "orange", "yellow", "green"]},
              "minItems": 2, "maxItems": 2}
    r = client.completions.create(model=MODEL, prompt="Two colours of the rainbow:",
                                  max_tokens=40, temperature=0,
                                  extra_body={"response_format": _json_schema(schema)})
    jsonschema.validate(json.loads(r.choices[0].text), schema)


def test_json_object(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=120, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give a JSON object with a city and country."}])
    content, finish = r.choices[0].message.content or "", r.choices[0].finish_reason
    assert content.startswith("{")
    if finish == "stop":  # json_object bounds nothing: a small model may run to max_tokens
        assert isinstance(json.loads(content), dict)
    else:
        assert finish == "length"


# Tool calls

def test_required_tool_calls(client: openai.OpenAI) -> None:
    """Parallel calls allowed: a small base model tends to call again and again, until the
    grammar's limit (16) or max_tokens; every complete call is valid."""
    r = client.chat.completions.create(model=MODEL, messages=WEATHER_ASK, tools=TOOLS,
                                       tool_choice="required", temperature=0, max_tokens=200)
    c = r.choices[0]
    assert c.message.tool_calls
    for call in c.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        _check_call(call.function.name, call.function.arguments)
    assert len({call.id for call in c.message.tool_calls}) == len(c.message.tool_calls)
    if c.finish_reason == "tool_calls":
        assert c.message.content is None
    else:  # cut inside the next call, which stays text
        assert c.finish_reason == "length"
        cut = (c.message.content or "").strip()
        assert cut.startswith("<tool_call>") or "<tool_call>".startswith(cut), cut


def test_named_tool_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=WEATHER_ASK, tools=TOOLS, temperature=0, max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert c.message.tool_calls and len(c.message.tool_calls) == 1
    call: Any = c.message.tool_calls[0]
    assert call.function.name == "get_time"
    _check_call(call.function.name, call.function.arguments)


@pytest.mark.parametrize("tool_choice", ["required", "get_weather"])
def test_streamed_tool_call(client: openai.OpenAI, tool_choice: str) -> None:
    choice: Any = tool_choice if tool_choice == "required" else {
        "type": "function", "function": {"name": tool_choice}}
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=WEATHER_ASK, tools=TOOLS, tool_choice=choice, temperature=0,
        max_tokens=200, parallel_tool_calls=False, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    parts = [t for d in deltas for t in d.tool_calls or []]
    assert parts and {p.index for p in parts} == {0}  # one call: no parallel calls
    first = parts[0]
    assert first.id and first.id.startswith("call_") and first.type == "function"
    assert first.function is not None and first.function.arguments == ""
    name = first.function.name or ""
    arguments = "".join(p.function.arguments or "" for p in parts[1:] if p.function)
    _check_call(name, arguments)
    if tool_choice != "required":
        assert name == tool_choice
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(d.content or "" for d in deltas)


def test_tool_round_trip(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model=MODEL, messages=WEATHER_ASK, tools=TOOLS,
                                           tool_choice="required", temperature=0,
                                           max_tokens=200, parallel_tool_calls=False)
    message = first.choices[0].message
    assert message.tool_calls
    call = message.tool_calls[0]
    history: Any = [*WEATHER_ASK, message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id,
                     "content": "18 degrees celsius and sunny"}]
    final = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                           tool_choice="none", temperature=0, max_tokens=40)
    answer = final.choices[0]
    assert answer.message.content and not answer.message.tool_calls
    assert answer.finish_reason in ("stop", "length")
    again = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                           temperature=0, max_tokens=60)
    _valid_auto_answer(again.choices[0])


def _valid_auto_answer(choice: Any) -> None:
    if choice.message.tool_calls:
        assert choice.finish_reason in ("tool_calls", "length")  # length: cut in a next call
        for call in choice.message.tool_calls:
            assert call.function.name in PARAMETERS
            json.loads(call.function.arguments)
    else:
        assert isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")


def test_tool_choice_auto_answers_in_a_valid_shape(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=WEATHER_ASK, tools=TOOLS,
                                       temperature=0, max_tokens=80)
    _valid_auto_answer(r.choices[0])
    chunks = list(client.chat.completions.create(model=MODEL, messages=WEATHER_ASK,
                                                 tools=TOOLS, temperature=0, max_tokens=80,
                                                 stream=True))
    finish = chunks[-1].choices[0].finish_reason
    assert finish == r.choices[0].finish_reason


# logprobs

def test_chat_logprobs_follow_the_greedy_choice(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=12,
                                       logprobs=True, top_logprobs=5)
    assert r.choices[0].logprobs is not None
    content = r.choices[0].logprobs.content or []
    assert r.usage is not None and len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 5
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        ranked = [t.logprob for t in entry.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
    assert b"".join(bytes(e.bytes or []) for e in content).decode() == r.choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, temperature=0,
                                                 max_tokens=12, logprobs=True, top_logprobs=2,
                                                 stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content or []]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(streamed) == 12 and all(e.top_logprobs[0].token == e.token for e in streamed)
    assert b"".join(bytes(e.bytes or []) for e in streamed).decode() == text


def test_completion_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="The three primary colours are",
                                  max_tokens=10, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert r.usage is not None and len(lp.tokens) == r.usage.completion_tokens
    assert all(p <= 0 for p in lp.token_logprobs)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert token in top and max(top.values()) == pytest.approx(logprob)
        assert len(top) <= 4
    assert lp.text_offset is not None and lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset)


# n choices

def test_three_choices(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=11,
                                       max_tokens=16, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content for c in r.choices)
    assert len({c.message.content for c in r.choices}) > 1
    assert r.usage is not None and r.usage.completion_tokens <= 48
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    single = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=16)
    assert single.usage is not None and r.usage.prompt_tokens == single.usage.prompt_tokens
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=1.0, seed=11, max_tokens=16, n=3, stream=True,
        stream_options={"include_usage": True}))
    texts = {i: "" for i in range(3)}
    finishes = {}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert all(texts.values()) and set(finishes) == {0, 1, 2}
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens == r.usage.prompt_tokens
    assert usage.completion_tokens == 48 or "stop" in finishes.values()


# Sampling extensions

def _greedy(client: openai.OpenAI, **extra: Any) -> str:
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12,
                                  **extra)
    return str(r.choices[0].text)


def test_top_k_and_min_p_reach_the_engine(client: openai.OpenAI) -> None:
    greedy = _greedy(client, temperature=0)
    assert _greedy(client, temperature=1.5, seed=5, extra_body={"top_k": 1}) == greedy
    assert _greedy(client, temperature=1.5, seed=5, extra_body={"min_p": 1.0}) == greedy
    assert _greedy(client, temperature=0, extra_body={"repeat_penalty": 1.3})


def _token_ids(text: str) -> list[int]:
    import llama_cpp

    vocab = llama_cpp.Llama(str(materialize(MODEL)), vocab_only=True, verbose=False)
    try:
        return list(vocab.tokenize(text.encode(), add_bos=False, special=False))
    finally:
        vocab.close()


def test_logit_bias_moves_off_the_greedy_token(client: openai.OpenAI) -> None:
    first = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=1,
                                      temperature=0).choices[0].text
    [token] = _token_ids(first)
    biased = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=1,
                                       temperature=0, logit_bias={str(token): -100})
    assert biased.choices[0].text != first
    favoured = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=1,
                                         temperature=0, logit_bias={str(token): 100})
    assert favoured.choices[0].text == first


# Bad inputs: 400 in the OpenAI shape, naming the parameter

BAD: list[tuple[str, dict[str, Any], str]] = [
    ("unknown tool in tool_choice", {"tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "get_stock"}}}, "tool_choice.function.name"),
    ("malformed tool", {"tools": [WEATHER, {"type": "function", "function": {
        "name": "bad name!"}}]}, "tools[1].function.name"),
    ("tool parameters not a schema", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "required": "city"}}}]},
     "tools[0].function.parameters"),
    ("invalid schema", {"response_format": _json_schema({"type": "strin"})},
     "response_format.json_schema.schema"),
    ("unsupported schema feature", {"response_format": _json_schema(
        {"type": "array", "items": {"type": "integer"}, "uniqueItems": True})},
     "response_format"),
    ("top_logprobs out of range", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("bad logit_bias key", {"logit_bias": {"the": 5}}, "logit_bias"),
    ("logit_bias out of range", {"logit_bias": {"5": -101}}, "logit_bias"),
    ("n out of range", {"n": 17}, "n"),
    ("min_p out of range", {"extra_body": {"min_p": 2}}, "min_p"),
    ("tool message without its call", {"messages": [
        *WEATHER_ASK, {"role": "tool", "content": "18C"}]}, "messages[1].tool_call_id"),
]


@pytest.mark.parametrize(("extra", "param"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_400_naming_the_param(client: openai.OpenAI, extra: dict[str, Any],
                                           param: str) -> None:
    body: Any = {"messages": WEATHER_ASK, "max_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, **body)
    error: Any = info.value.body
    assert info.value.status_code == 400
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}


def test_completion_logprobs_out_of_range_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, logprobs=21)
    error: Any = info.value.body
    assert error["param"] == "logprobs"
