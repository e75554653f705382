"""The launcher's decisions without processes: what `up` says once ready, its switches,
and `mesh-llm chat`'s commands, requests and stream reading."""

from __future__ import annotations

import io
import json
import os

import pytest
from meshllm.cli.chat import (
    ChatFailed,
    Command,
    Conversation,
    Usage,
    parse_line,
    request_body,
    stream_items,
)
from meshllm.cli.output import say
from meshllm.cli.ready import readiness_lines, unserved
from meshllm.cli.up_config import load_up_config
from meshllm.common.errors import ConfigError
from meshllm.common.status import MeshStatus, ModelStatus, ServingState
from meshllm.common.types import ModelId

URL = "http://localhost:9337/v1"


def model(name: str, state: ServingState, reason: str = "") -> ModelStatus:
    return ModelStatus(ModelId(name), "catalog", 18, 4096, 1, 2, state, reason)


@pytest.mark.parametrize(("models", "expected"), [
    ((model("a", ServingState.SERVING),),
     [f"Ready: {URL}   (Ctrl-C stops the mesh)"]),
    ((model("a", ServingState.NOT_SERVED, "needs 2 GiB, the largest worker has 1 GiB"),),
     ["Ready, but a is not served: needs 2 GiB, the largest worker has 1 GiB",
      f"  the gateway answers at {URL}   (Ctrl-C stops the mesh)"]),
    ((model("a", ServingState.SERVING), model("b", ServingState.NOT_SERVED, "b is too big")),
     ["Ready, but b is not served: is too big",
      f"  the gateway answers at {URL}   (Ctrl-C stops the mesh)"]),
])
def test_ready_says_which_models_are_not_served(models: tuple[ModelStatus, ...],
                                                expected: list[str]) -> None:
    status = MeshStatus(models=models)
    assert readiness_lines(status, URL) == expected
    assert [m.model_id for m in unserved(status)] == [
        m.model_id for m in models if m.state is ServingState.NOT_SERVED]


@pytest.mark.parametrize(("argv", "env", "require", "open_"), [
    ([], {}, False, False),
    (["--require-models"], {}, True, False),
    (["--open", "--require-models"], {}, True, True),
    ([], {"MESHLLM_UP_REQUIRE_MODELS": "1", "MESHLLM_UP_OPEN": "yes"}, True, True),
    (["--require-models=false"], {"MESHLLM_UP_REQUIRE_MODELS": "true"}, False, False),
])
def test_up_switches(argv: list[str], env: dict[str, str], require: bool, open_: bool
                     ) -> None:
    cfg = load_up_config([*argv, "--worker-memory", "1GiB"], env)
    assert (cfg.require_models, cfg.open_console) == (require, open_)


def test_a_switch_variable_must_say_true_or_false() -> None:
    with pytest.raises(ConfigError, match="MESHLLM_UP_REQUIRE_MODELS"):
        load_up_config(["--worker-memory", "1GiB"], {"MESHLLM_UP_REQUIRE_MODELS": "maybe"})


@pytest.mark.parametrize(("line", "parsed"), [
    ("", None),
    ("   ", None),
    ("Hello there ", "Hello there"),
    ("/reset", Command("reset")),
    ("/model  qwen-7b ", Command("model", "qwen-7b")),
    ("/model", Command("model")),
    ("/usage", Command("usage")),
    ("/QUIT", Command("quit")),
    ("/bye", Command("quit")),
    ("/frobnicate", Command("help", "/frobnicate")),
])
def test_chat_lines(line: str, parsed: Command | str | None) -> None:
    assert parse_line(line) == parsed


def test_a_chat_request_carries_the_history_and_the_settings() -> None:
    conversation = Conversation("m", system="be brief")
    conversation.record("one", "1")
    body = request_body(conversation, "two", max_tokens=32, temperature=0.0)
    assert body == {
        "model": "m", "stream": True, "stream_options": {"include_usage": True},
        "max_tokens": 32, "temperature": 0.0,
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": "one"},
                     {"role": "assistant", "content": "1"},
                     {"role": "user", "content": "two"}]}
    assert "max_tokens" not in request_body(Conversation("m"), "x", None, None)


def _data(chunk: object) -> str:
    return "data: " + json.dumps(chunk)


def test_the_stream_gives_text_then_usage_and_stops_at_done() -> None:
    lines = [": connected", "",
             _data({"choices": [{"delta": {"role": "assistant"}}]}), "",
             _data({"choices": [{"delta": {"content": "Hel"}}]}),
             _data({"choices": [{"delta": {"content": "lo"}, "finish_reason": None}]}),
             _data({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2,
                                             "total_tokens": 11}}),
             "data: [DONE]", _data({"choices": [{"delta": {"content": "after"}}]})]
    assert list(stream_items(lines)) == ["Hel", "lo", Usage(9, 2)]


def test_an_error_event_in_the_stream_fails_the_turn() -> None:
    lines = [_data({"choices": [{"delta": {"content": "a"}}]}),
             _data({"error": {"message": "the engine crashed", "code": "engine_unavailable"}})]
    items = stream_items(lines)
    assert next(items) == "a"
    with pytest.raises(ChatFailed, match="the engine crashed"):
        next(items)


def test_say_survives_a_broken_pipe() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = io.TextIOWrapper(io.FileIO(write_end, "w"))
    say("stopping the mesh...", stream)  # EPIPE: silenced, not raised
    say("stopped", stream)
    stream.close()  # its flush goes to /dev/null now
