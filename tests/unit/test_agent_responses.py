"""Tool calls, logprobs and n choices in answers and streams, through the real app with a
scripted backend (no worker)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from meshllm.common.errors import MeshError
from meshllm.common.types import (
    Finished,
    GenerateEvent,
    ModelId,
    SamplingParams,
    TokenDelta,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from meshllm.gateway.app import Api, build_app
from meshllm.gateway.choices import generate_request, merged, total_usage
from meshllm.gateway.metrics import GatewayMetrics
from meshllm.gateway.openai_api import ApiRequest
from starlette.testclient import TestClient

from tests.support.scripted_choices import Script, ScriptedChoices

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _lp(token: str, logprob: float, *alternatives: tuple[str, float]) -> TokenLogprob:
    top = tuple(TopLogprob(t, t.encode(), p) for t, p in ((token, logprob), *alternatives))
    return TokenLogprob(token, token.encode(), logprob, top)


def _post(script: Script, body: dict[str, Any], path: str = "/v1/chat/completions") -> Any:
    client = TestClient(build_app(Api(ScriptedChoices(script), GatewayMetrics())))
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        return r.json()
    lines = [line.removeprefix("data: ") for line in r.text.splitlines() if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _pieces(text: str, size: int = 5) -> list[tuple[int, GenerateEvent]]:
    return [(0, TokenDelta(text[i:i + size], 1)) for i in range(0, len(text), size)]


STOP: tuple[int, GenerateEvent] = (0, Finished("stop", Usage(10, 12)))


def test_a_call_is_a_tool_call_message() -> None:
    body = _post([*_pieces(CALL), STOP], {**CHAT, "tools": TOOLS})
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    [call] = message["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_a_cut_answer_keeps_its_calls_and_says_length() -> None:
    cut = CALL + "\n<tool_call>\n{\"name\": \"get"
    script: Script = [*_pieces(cut), (0, Finished("length", Usage(10, 40)))]
    body = _post(script, {**CHAT, "tools": TOOLS})
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["message"]["tool_calls"]) == 1
    assert choice["message"]["content"] == '<tool_call>\n{"name": "get'
    chunks = _post(script, {**CHAT, "tools": TOOLS, "stream": True})
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_text_stays_text_without_tools_or_with_none() -> None:
    for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        body = _post([*_pieces(CALL), STOP], {**CHAT, **extra})
        assert body["choices"][0]["message"]["content"] == CALL
        assert body["choices"][0]["finish_reason"] == "stop"


def test_streamed_call_comes_as_openai_sends_it() -> None:
    text = "Let me look.\n" + CALL + "\n" + CALL.replace("Paris", "Rome")
    chunks = _post([*_pieces(text, 3), STOP], {**CHAT, "tools": TOOLS, "stream": True})
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content") or "" for d in deltas) == "Let me look."
    calls = [t for d in deltas for t in d.get("tool_calls", [])]
    assert [set(t) for t in calls] == [{"index", "id", "type", "function"}, {"index", "function"}
                                       ] * 2
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert [t["index"] for t in calls] == [0, 0, 1, 1]
    assert json.loads(calls[3]["function"]["arguments"]) == {"city": "Rome"}
    assert calls[0]["id"] != calls[2]["id"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_without_parallel_calls_only_the_first_counts() -> None:
    two = CALL + "\n" + CALL.replace("Paris", "Rome")
    body = {**CHAT, "tools": TOOLS, "parallel_tool_calls": False}
    assert len(_post([*_pieces(two), STOP], body)["choices"][0]["message"]["tool_calls"]) == 1
    chunks = _post([*_pieces(two), STOP], {**body, "stream": True})
    calls = [t for c in chunks for t in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [t["index"] for t in calls] == [0, 0]


LOGPROBS: list[tuple[int, GenerateEvent]] = [
    (0, TokenDelta("Hi", 1, (_lp("Hi", -0.1, ("Yo", -2.5)),))),
    (0, TokenDelta(" é", 1, (_lp(" é", -0.5, ("!", -1.5)),))), STOP]


def test_chat_logprobs() -> None:
    body = _post(LOGPROBS, {**CHAT, "logprobs": True, "top_logprobs": 1})
    content = body["choices"][0]["logprobs"]["content"]
    assert body["choices"][0]["logprobs"]["refusal"] is None
    assert content[0] == {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": [
        {"token": "Hi", "logprob": -0.1, "bytes": [72, 105]},
        {"token": "Yo", "logprob": -2.5, "bytes": [89, 111]}]}
    assert content[1]["bytes"] == list(" é".encode())
    chunks = _post(LOGPROBS, {**CHAT, "logprobs": True, "stream": True})
    streamed = [t for c in chunks if (lp := c["choices"][0]["logprobs"]) for t in lp["content"]]
    assert streamed == content


def test_completion_logprobs() -> None:
    body = _post(LOGPROBS, {"model": "m", "prompt": "x", "logprobs": 1}, "/v1/completions")
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs == {"tokens": ["Hi", " é"], "token_logprobs": [-0.1, -0.5],
                        "top_logprobs": [{"Hi": -0.1, "Yo": -2.5}, {" é": -0.5, "!": -1.5}],
                        "text_offset": [0, 2]}
    chunks = _post(LOGPROBS, {"model": "m", "prompt": "x", "logprobs": 1, "stream": True},
                   "/v1/completions")
    offsets = [o for c in chunks if (lp := c["choices"][0]["logprobs"])
               for o in lp["text_offset"]]
    assert offsets == [0, 2]


def test_no_logprobs_unless_asked() -> None:
    assert _post(LOGPROBS, CHAT)["choices"][0]["logprobs"] is None


N3: list[tuple[int, GenerateEvent]] = [
    (1, TokenDelta("b", 1)), (0, TokenDelta("a", 1)), (2, TokenDelta("c", 2)),
    (2, Finished("length", Usage(10, 2, 4))), (0, Finished("stop", Usage(10, 1, 4))),
    (1, Finished("stop", Usage(10, 1, 0)))]


def test_n_choices_merge_in_order_with_usage_summed() -> None:
    body = _post(N3, {**CHAT, "n": 3})
    assert [(c["index"], c["message"]["content"], c["finish_reason"])
            for c in body["choices"]] == [(0, "a", "stop"), (1, "b", "stop"), (2, "c", "length")]
    assert body["usage"]["prompt_tokens"] == 10 and body["usage"]["completion_tokens"] == 4
    chunks = _post(N3, {**CHAT, "n": 3, "stream": True, "stream_options": {
        "include_usage": True}})
    assert [c["choices"][0]["index"] for c in chunks[:3]] == [0, 1, 2]  # one role chunk each
    finishes = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"]
                for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]}
    assert finishes == {0: "stop", 1: "stop", 2: "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_total_usage_counts_the_prompt_once() -> None:
    assert total_usage([Usage(10, 1, 4), Usage(10, 3, 0)]) == Usage(10, 4, 4)


def test_each_choice_gets_its_own_seed() -> None:
    req = ApiRequest("chat", "m", SamplingParams(seed=2**64 - 1), False, False, n=3)
    seeds = [generate_request(req, ModelId("m"), i).sampling.seed for i in range(3)]
    assert seeds == [2**64 - 1, 0, 1]
    unseeded = ApiRequest("chat", "m", SamplingParams(), False, False, n=2)
    assert generate_request(unseeded, ModelId("m"), 1).sampling.seed is None


async def _events(items: list[GenerateEvent], delay_s: float = 0.0,
                  error: MeshError | None = None) -> AsyncGenerator[GenerateEvent, None]:
    for item in items:
        await asyncio.sleep(delay_s)
        yield item
    if error is not None:
        raise error


async def test_merged_interleaves_and_ends_with_the_first_error() -> None:
    done = Finished("stop", Usage(1, 1))
    seen = [item async for item in merged([_events([TokenDelta("a", 1), done], 0.01),
                                           _events([done])])]
    assert sorted(seen, key=lambda x: x[0]) == [(0, TokenDelta("a", 1)), (0, done), (1, done)]
    assert seen[0] == (1, done)
    with pytest.raises(MeshError, match="boom"):
        _ = [x async for x in merged([_events([done], 1.0), _events([], error=MeshError(
            "boom"))])]
