"""Round trips through protobuf, and rejection of invalid records from the network."""

from __future__ import annotations

import dataclasses

import pytest
from meshllm.common import convert
from meshllm.common.errors import InvalidRecord
from meshllm.common.types import (
    Assignment,
    ChatMessage,
    Embeddings,
    EmbedRequest,
    Finished,
    GenerateRequest,
    Grammar,
    GrammarKind,
    LoadState,
    ModelId,
    ModelSpec,
    ModelState,
    Placement,
    Replica,
    RequestId,
    SamplingParams,
    TokenDelta,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
    WorkerId,
    WorkerInfo,
    WorkerStats,
)
from meshllm.v1 import mesh_pb2, worker_pb2

WORKER = WorkerInfo(WorkerId("w1"), "10.0.0.1:9340", "cuda", 8 << 30, 4, 12.5,
                    (ModelState(ModelId("m"), LoadState.READY, "", 2),
                     ModelState(ModelId("n"), LoadState.FAILED, "oom", 0)),
                    {"w2": 0.5, "w3": 12.25}, "10.0.0.1")
SPEC = ModelSpec(ModelId("m"), "m.gguf", 1000, 2, 4096, 18432, "gemma3", 32768, 400,
                 (300, 300), True)
PLACEMENT = Placement(ModelId("m"), (
    Replica((Assignment(WorkerId("w1"), 0, 18),)),
    Replica((Assignment(WorkerId("w2"), 0, 6), Assignment(WorkerId("w3"), 6, 18))),
), 2000)


def test_worker_round_trip() -> None:
    raw = convert.worker_to_pb(WORKER).SerializeToString()
    assert convert.parse_worker(raw) == WORKER


def test_spec_and_placement_round_trip() -> None:
    assert convert.parse_model_spec(convert.model_spec_to_pb(SPEC).SerializeToString()) == SPEC
    for template in ("name:gemma", "text:{% for m in messages %}{{ m.content }}{% endfor %}"):
        spec = dataclasses.replace(SPEC, chat_template=template)
        assert convert.model_spec_from_pb(convert.model_spec_to_pb(spec)) == spec
    fast = dataclasses.replace(SPEC, deterministic=False)
    assert convert.model_spec_from_pb(convert.model_spec_to_pb(fast)) == fast
    # A record that does not say (an older planner's) is reproducible, the default.
    assert convert.model_spec_from_pb(mesh_pb2.ModelSpec(
        model_id="m", source="m.gguf", weights_bytes=1, n_layers=1, context_length=1)
    ).deterministic
    raw = convert.placement_to_pb(PLACEMENT).SerializeToString()
    assert convert.parse_placement(raw) == PLACEMENT
    unplaced = Placement(ModelId("m"), (), 5, "too big")
    assert convert.placement_from_pb(convert.placement_to_pb(unplaced)) == unplaced


@pytest.mark.parametrize("request_", [
    GenerateRequest(RequestId("r"), ModelId("m"), text="hello",
                    sampling=SamplingParams(5, 0.0, 0.9, 42, ("a", "b"))),
    GenerateRequest(RequestId("r"), ModelId("m"),
                    chat=(ChatMessage("system", "s"), ChatMessage("user", "u"))),
    GenerateRequest(RequestId("r"), ModelId("m"), text="", sampling=SamplingParams(seed=None)),
    GenerateRequest(RequestId("r"), ModelId("m"), text="{", logprobs=0,
                    sampling=SamplingParams(min_p=0.05, logit_bias=((3, -100.0), (7, 2.5))),
                    grammar=Grammar(GrammarKind.JSON_SCHEMA, '{"type": "object"}')),
    GenerateRequest(RequestId("r"), ModelId("m"), logprobs=5,
                    grammar=Grammar(GrammarKind.LARK, 'start: "yes" | "no"'),
                    tools_json='[{"type": "function", "function": {"name": "f"}}]',
                    chat=(ChatMessage("user", "weather?"),
                          ChatMessage("assistant", "", (ToolCall("call_1", "f", '{"x": 1}'),)),
                          ChatMessage("tool", "sunny", tool_call_id="call_1", name="f"))),
], ids=["text", "chat", "empty text, no seed", "grammar, logprobs, bias", "tool round trip"])
def test_generate_request_round_trip(request_: GenerateRequest) -> None:
    assert convert.generate_request_from_pb(convert.generate_request_to_pb(request_)) == request_


def test_events_and_stats_round_trip() -> None:
    top = (TopLogprob("hé", "hé".encode(), -0.25), TopLogprob("\\xe2", b"\xe2", -3.0))
    logprob = TokenLogprob("hé", "hé".encode(), -0.25, top)
    for event in (TokenDelta("hé", 1), Finished("length", Usage(3, 4)),
                  TokenDelta("hé", 1, (logprob,))):
        assert convert.event_from_pb(convert.event_to_pb(event)) == event
    stats = WorkerStats(WorkerId("w"), 1, 2, 3, 4, WORKER.models)
    assert convert.stats_from_pb(convert.stats_to_pb(stats)) == stats


@pytest.mark.parametrize(("record", "problem"), [
    (mesh_pb2.WorkerRecord(address="h:1", memory_budget_bytes=1, threads=1), "without worker_id"),
    (mesh_pb2.WorkerRecord(worker_id="w", address="nohost", memory_budget_bytes=1, threads=1),
     "bad address"),
    (mesh_pb2.WorkerRecord(worker_id="w", address="h:1", threads=1), "memory budget"),
    (mesh_pb2.WorkerRecord(worker_id="w", address="h:1", memory_budget_bytes=1), "threads"),
])
def test_invalid_worker_records_are_rejected(record: mesh_pb2.WorkerRecord, problem: str) -> None:
    with pytest.raises(InvalidRecord, match=problem):
        convert.parse_worker(record.SerializeToString())


def test_garbage_bytes_are_rejected() -> None:
    with pytest.raises(InvalidRecord):
        convert.parse_worker(b"\xff\xff\xff")


def _stages(*ranges: tuple[str, int, int]) -> mesh_pb2.Placement:
    stages = [mesh_pb2.Assignment(worker_id=w, layer_start=a, layer_end=b) for w, a, b in ranges]
    return mesh_pb2.Placement(model_id="m", replicas=[mesh_pb2.Replica(stages=stages)])


@pytest.mark.parametrize(("placement", "problem"), [
    (_stages(("w", 0, 0)), "empty layer range"),
    (_stages(("w", 2, 5)), "head does not start at 0"),
    (_stages(("a", 0, 3), ("b", 4, 8)), "not contiguous"),
    (_stages(("a", 0, 3), ("a", 3, 8)), "two stages"),
    (_stages(("", 0, 3)), "without worker"),
    (mesh_pb2.Placement(model_id="m", replicas=[mesh_pb2.Replica()]), "without stages"),
], ids=["empty range", "head offset", "gap", "same worker twice", "no worker", "no stages"])
def test_invalid_placements_are_rejected(placement: mesh_pb2.Placement, problem: str) -> None:
    with pytest.raises(InvalidRecord, match=problem):
        convert.parse_placement(placement.SerializeToString())


def test_spec_with_wrong_layer_count_is_rejected() -> None:
    bad = convert.model_spec_to_pb(SPEC)
    bad.layer_bytes.append(1)
    with pytest.raises(InvalidRecord, match="3 layer sizes for 2 layers"):
        convert.parse_model_spec(bad.SerializeToString())


@pytest.mark.parametrize("request_", [
    EmbedRequest(RequestId("r"), ModelId("m"), ("hello",)),
    EmbedRequest(RequestId("r"), ModelId("m"), ("a", "", (2, 651, 1000))),
    EmbedRequest(RequestId("r"), ModelId("m"), ((1,), ())),
], ids=["one text", "texts and tokens", "token lists"])
def test_embed_request_round_trip(request_: EmbedRequest) -> None:
    assert convert.embed_request_from_pb(convert.embed_request_to_pb(request_)) == request_


def test_embeddings_round_trip() -> None:
    # float32 values: what the wire carries exactly
    embeddings = Embeddings(((0.5, -0.25, 0.0), (1.0, 0.125, -0.75)), 9)
    assert convert.embeddings_from_pb(convert.embeddings_to_pb(embeddings)) == embeddings


@pytest.mark.parametrize(("message", "problem"), [
    (worker_pb2.EmbedRequest(inputs=[worker_pb2.EmbedInput(text="x")]), "without model_id"),
    (worker_pb2.EmbedRequest(model_id="m"), "without inputs"),
    (worker_pb2.EmbedRequest(model_id="m", inputs=[worker_pb2.EmbedInput()]),
     "without text or tokens"),
])
def test_invalid_embed_requests_are_rejected(message: worker_pb2.EmbedRequest,
                                             problem: str) -> None:
    with pytest.raises(InvalidRecord, match=problem):
        convert.embed_request_from_pb(message)
