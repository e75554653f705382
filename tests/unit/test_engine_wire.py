"""The engine pipe's messages: every command and event survives encode -> decode, errors
come back as their typed classes, and malformed lines are refused with a typed error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from meshllm.common.errors import (
    EngineBusy,
    EngineUnavailable,
    InvalidGenerateRequest,
    MeshError,
    PromptTooLong,
)
from meshllm.common.types import (
    ChatMessage,
    EmbedRequest,
    GenerateRequest,
    Grammar,
    GrammarKind,
    ModelId,
    RequestId,
    SamplingParams,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)
from meshllm.worker import engine_wire as wire
from meshllm.worker.engine.batch.errors import DecodeFailed, QueueFull, engine_error

R = RequestId("req-1")
SAMPLING = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, seed=42,
                          stop=("\n\n", "END"), top_k=40, presence_penalty=0.1,
                          frequency_penalty=0.2, repeat_penalty=1.1, min_p=0.05,
                          logit_bias=((3, -100.0), (7, 2.5)))
TOOL_TURNS = (
    ChatMessage("user", "weather in Paris?"),
    ChatMessage("assistant", "", (ToolCall("call_1", "get_weather", '{"city": "Paris"}'),
                                  ToolCall("call_2", "get_time", "{}"))),
    ChatMessage("tool", '{"temp": 21}', tool_call_id="call_1", name="get_weather"),
)
SCHEMA = Grammar(GrammarKind.JSON_SCHEMA, '{"type": "object"}')
LOGPROB = TokenLogprob("\\xe2", b"\xe2", -0.25, (TopLogprob("\\xe2", b"\xe2", -0.25),
                                                 TopLogprob(" é", " é".encode(), -1.5)))

COMMANDS: list[wire.Command] = [
    wire.Load(Path("/models/gemma.gguf"), 4096, 2),
    wire.Load(Path("/m.gguf"), 512, 1, rpc_endpoints=("10.0.0.2:50052", "10.0.0.3:50052"),
              stage_layers=(6, 5), weight_repack=True, slots=4, max_queue=3,
              speculative="draft:/d.gguf", rpc_library="stock"),
    wire.Load(Path("/m.gguf"), 512, 1, chat_template="name:chatml"),
    wire.Load(Path("/m.gguf"), 512, 1, chat_template="text:{{ messages[0].content }}\n✓"),
    wire.Load(Path("/m.gguf"), 512, 1, deterministic=False),
    wire.Load(Path("/m.gguf"), 512, 1, rpc_endpoints=("h:1",), stage_layers=(9,),
              link_rtt_s=0.0215),
    wire.Generate(R, "Once upon a time", None, SAMPLING),
    wire.Generate(R, None, (ChatMessage("system", "be brief"), ChatMessage("user", "héllo ✓")),
                  SamplingParams()),
    wire.Generate(R, None, TOOL_TURNS, SAMPLING, tools_json='[{"type": "function"}]'),
    wire.Generate(R, "{", None, SAMPLING, grammar=SCHEMA, logprobs=5),
    wire.Generate(R, None, TOOL_TURNS, SamplingParams(),
                  grammar=Grammar(GrammarKind.LARK, 'start: "<tool_call>" %json {}'),
                  logprobs=0),
    wire.Cancel(R),
    wire.Embed(R, ("héllo ✓",)),
    wire.Embed(R, ("a", "", (2, 651, 1000), ())),
    wire.SetLinkRtt(0.042),
    wire.SetLinkRtt(0.0),
]

EVENTS: list[wire.Event] = [
    wire.Progress(0.35),
    wire.Progress(1.0),
    wire.Loaded(4096),
    wire.LoadFailed(wire.WireError("engine_unavailable", "OSError: no such file")),
    wire.Delta(R, "hel", 2),
    wire.Delta(R, "", 1),  # text held back (a partial stop string)
    wire.Delta(R, "\u00e9!", 2, (LOGPROB, TokenLogprob("!", b"!", -0.01))),
    wire.Finished(R, "stop", Usage(12, 5, 8), 1_700_000_000_000_000_000,
                  1_700_000_000_100_000_000),
    wire.Error(R, wire.WireError.of(PromptTooLong(5000, 4096))),
    wire.Embedded(R, (b"\x00\x00\x80?\x00\x00\x00\xbf", b"\x00" * 8), 12),
    wire.Embedded(R, (), 0),
    wire.Error(R, wire.WireError.of(InvalidGenerateRequest("token id 9 >= vocab", "input"))),
    wire.Stats(wire.EngineStats(1, 2, 16, 4, 100, 90, 120, 300, 40, 50, 30)),
    wire.Stats(wire.EngineStats(1, 0, 16, 4, 10, 9, 12, 30, 4, 5, 3, link_rtt_us=21_500)),
    wire.Stats(wire.EngineStats()),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: type(c).__name__)
def test_every_command_round_trips(command: wire.Command) -> None:
    line = wire.encode(command)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert wire.decode_command(line) == command


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_every_event_round_trips(event: wire.Event) -> None:
    line = wire.encode(event)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert wire.decode_event(line) == event


def test_generate_carries_the_request() -> None:
    request = GenerateRequest(R, ModelId("m"), "hi", None, SAMPLING)
    sent = wire.decode_command(wire.encode(wire.Generate.of(request)))
    assert isinstance(sent, wire.Generate)
    assert (sent.request_id, sent.text, sent.chat, sent.sampling) == (R, "hi", None, SAMPLING)


def test_embed_carries_the_request() -> None:
    request = EmbedRequest(R, ModelId("m"), ("hi", (5, 6)))
    sent = wire.decode_command(wire.encode(wire.Embed.of(request)))
    assert sent == wire.Embed(R, ("hi", (5, 6)))


def test_generate_carries_grammar_logprobs_tools_and_tool_turns() -> None:
    request = GenerateRequest(R, ModelId("m"), None, TOOL_TURNS, SAMPLING, grammar=SCHEMA,
                              logprobs=3, tools_json='[{"type": "function"}]')
    sent = wire.decode_command(wire.encode(wire.Generate.of(request)))
    assert isinstance(sent, wire.Generate)
    assert (sent.chat, sent.grammar, sent.logprobs, sent.tools_json) == (
        TOOL_TURNS, SCHEMA, 3, '[{"type": "function"}]')


def _across(error: BaseException) -> MeshError:
    """`error` sent by the engine as an Error event and rebuilt by the worker."""
    event = wire.decode_event(wire.encode(wire.Error(R, wire.WireError.of(error))))
    assert isinstance(event, wire.Error)
    return event.error.rebuild()


@pytest.mark.parametrize(("sent", "arrives_as"), [
    (PromptTooLong(5000, 4096), PromptTooLong),
    (InvalidGenerateRequest("messages[0].role must be one of ..."), InvalidGenerateRequest),
    (QueueFull(4, 16, 16), EngineBusy),
    (EngineBusy("busy"), EngineBusy),
    (DecodeFailed(-3), EngineUnavailable),
    (engine_error(RuntimeError("numpy broke")), EngineUnavailable),
    (ValueError("not a mesh error"), EngineUnavailable),
], ids=lambda v: v.__name__ if isinstance(v, type) else type(v).__name__)
def test_errors_are_rebuilt_as_their_typed_classes(sent: BaseException,
                                                   arrives_as: type[MeshError]) -> None:
    rebuilt = _across(sent)
    assert type(rebuilt) is arrives_as
    if isinstance(sent, MeshError):
        assert str(rebuilt) == str(sent)
    else:
        assert str(rebuilt) == "ValueError: not a mesh error"


def test_prompt_too_long_keeps_its_token_counts() -> None:
    rebuilt = _across(PromptTooLong(5000, 4096))
    assert isinstance(rebuilt, PromptTooLong)
    assert (rebuilt.prompt_tokens, rebuilt.context_length) == (5000, 4096)


def test_queue_full_is_engine_busy() -> None:
    assert QueueFull.reason == EngineBusy.reason == "engine_busy"
    assert isinstance(QueueFull(1, 2, 3), EngineBusy)


def test_an_unknown_reason_is_the_engine_unavailable() -> None:
    rebuilt = wire.WireError("from_a_newer_engine", "something new").rebuild()
    assert type(rebuilt) is EngineUnavailable
    assert str(rebuilt) == "from_a_newer_engine: something new"


def test_stats_derive_rates() -> None:
    stats = wire.EngineStats(seq_steps=10, generated_tokens=25, drafted_tokens=40,
                             accepted_tokens=30)
    assert (stats.tokens_per_step, stats.acceptance_rate) == (2.5, 0.75)
    assert (wire.EngineStats().tokens_per_step, wire.EngineStats().acceptance_rate) == (0, 0)


def _line(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def _good_generate(**changes: object) -> dict[str, object]:
    body = json.loads(wire.encode(wire.Generate(R, "hi", None, SamplingParams())))
    return {**body, **changes}


MALFORMED_COMMANDS = {
    "not JSON": b"{op: load}\n",
    "not UTF-8": b'{"op": "cancel", "request_id": "\xff"}\n',
    "empty line": b"",
    "not an object": b"[1, 2]\n",
    "no tag": _line(request_id="r"),
    "unknown tag": _line(op="reload", request_id="r"),
    "an event tag": _line(ev="cancel", request_id="r"),
    "missing field": _line(op="cancel"),
    "wrong type": _line(op="cancel", request_id=7),
    "unknown field": _line(op="cancel", request_id="r", priority=1),
    "bool for an int": _line(**_good_generate(sampling={
        **json.loads(json.dumps(SamplingParams().__dict__)), "max_tokens": True})),
    "nested unknown field": _line(**_good_generate(sampling={
        **json.loads(json.dumps(SamplingParams().__dict__)), "typical_p": 0.1})),
    "unknown grammar kind": _line(**_good_generate(grammar={"kind": "gbnf", "source": "x"})),
    "logit bias not pairs": _line(**_good_generate(sampling={
        **json.loads(json.dumps(SamplingParams().__dict__)), "logit_bias": [[3]]})),
    "tool call without arguments": _line(**_good_generate(chat=[{
        "role": "assistant", "content": "", "tool_call_id": "", "name": "",
        "tool_calls": [{"call_id": "c", "name": "f"}]}])),
    "chat message not an object": _line(**_good_generate(chat=["hello"])),
    "chat message without content": _line(**_good_generate(chat=[{"role": "user"}])),
    "embed input neither text nor tokens": _line(op="embed", request_id="r", inputs=[1]),
    "embed tokens not integers": _line(op="embed", request_id="r", inputs=[[1, "2"]]),
    "embed tokens with a bool": _line(op="embed", request_id="r", inputs=[[True]]),
    "link round trip not a number": _line(op="link_rtt", rtt_s="20ms"),
    "link round trip missing": _line(op="link_rtt"),
    "list of the wrong items": _line(**_good_generate(sampling={
        **json.loads(json.dumps(SamplingParams().__dict__)), "stop": [1]})),
}

MALFORMED_EVENTS = {
    "a command tag": _line(op="cancel", request_id="r"),
    "unknown event": _line(ev="exploded"),
    "string for a number": _line(ev="progress", fraction="0.5"),
    "details not strings": _line(ev="error", request_id="r", error={
        "reason": "context_length_exceeded", "message": "m", "details": {"prompt_tokens": 5}}),
    "usage missing a count": _line(ev="finished", request_id="r", finish_reason="stop",
                                   usage={"prompt_tokens": 1, "completion_tokens": 2},
                                   started_ns=0, first_token_ns=0),
    "vector not hex": _line(ev="embedded", request_id="r", vectors=["xx"], prompt_tokens=1),
    "embedded without usage": _line(ev="embedded", request_id="r", vectors=[]),
    "stats not an object": _line(ev="stats", stats=[1, 2, 3]),
    "token bytes not hex": _line(ev="delta", request_id="r", text="a", tokens=1, logprobs=[
        {"token": "a", "token_bytes": "zz", "logprob": -1.0, "top": []}]),
}


@pytest.mark.parametrize("line", MALFORMED_COMMANDS.values(), ids=MALFORMED_COMMANDS.keys())
def test_malformed_commands_are_refused(line: bytes) -> None:
    with pytest.raises(wire.MalformedEngineMessage):
        wire.decode_command(line)


@pytest.mark.parametrize("line", MALFORMED_EVENTS.values(), ids=MALFORMED_EVENTS.keys())
def test_malformed_events_are_refused(line: bytes) -> None:
    with pytest.raises(wire.MalformedEngineMessage):
        wire.decode_event(line)


def test_a_malformed_line_is_a_typed_error_with_its_own_reason() -> None:
    with pytest.raises(wire.MalformedEngineMessage) as info:
        wire.decode_event(b'{"ev": "loaded"}\n')
    assert "n_ctx is missing" in str(info.value)
    assert isinstance(info.value, EngineUnavailable)
    assert wire.MalformedEngineMessage.reason == "malformed_engine_message"


def test_each_default_has_one_source() -> None:
    from meshllm.worker.config import OPTIONS
    from meshllm.worker.engine.batch import BatchConfig
    from meshllm.worker.hosts import HostDeps

    load = wire.Load(Path("m"), 1, 1)
    assert (load.max_queue, load.slots, load.weight_repack, load.speculative,
            load.rpc_library) == (wire.DEFAULT_MAX_QUEUE, wire.DEFAULT_SLOTS,
                                  wire.DEFAULT_WEIGHT_REPACK, wire.DEFAULT_SPECULATIVE,
                                  wire.DEFAULT_RPC_LIBRARY)
    assert BatchConfig(model_path="m").max_queue == wire.DEFAULT_MAX_QUEUE
    assert HostDeps.__dataclass_fields__["max_queue"].default == wire.DEFAULT_MAX_QUEUE
    flag = next(o for o in OPTIONS if o.flag == "--max-queue")
    assert flag.default == str(wire.DEFAULT_MAX_QUEUE)
