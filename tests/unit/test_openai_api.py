"""Validation of OpenAI request bodies: table-driven good and bad inputs."""

from __future__ import annotations

from typing import Any

import pytest
from meshllm.common.types import ChatMessage
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
    ("n > 1", {**CHAT, "n": 2}, "n"),
    ("tools", {**CHAT, "tools": [{"type": "function"}]}, "tools"),
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
