"""The worker's gRPC edge over a scripted engine on a real server: events out, typed
errors as status + reason code, counters kept by the Worker, slots freed on cancel."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health
from meshllm.common import convert, grpc_errors
from meshllm.common.errors import (
    EngineBusy,
    EngineUnavailable,
    InvalidGenerateRequest,
    MeshError,
    PromptTooLong,
)
from meshllm.common.membership import Registration
from meshllm.common.types import (
    Embeddings,
    EmbedRequest,
    Finished,
    GenerateEvent,
    GenerateRequest,
    LoadState,
    ModelId,
    ModelSpec,
    ModelState,
    RequestId,
    SamplingParams,
    TokenDelta,
    Usage,
)
from meshllm.v1 import worker_pb2, worker_pb2_grpc
from meshllm.worker.config import WorkerConfig
from meshllm.worker.engine_wire import EngineStats
from meshllm.worker.hosts import HostDeps, ModelHost
from meshllm.worker.links import LinkMonitor
from meshllm.worker.plans import HostPlan, Role
from meshllm.worker.service import ShardWorkerServicer, Worker
from meshllm.worker.stage import StageServer

M = ModelId("m")
SPEC = ModelSpec(M, "m", 1, 1, 64, 1, "gemma3", 64)


class ScriptedEngine:
    """Answers by the prompt: "too long", "busy", "hang" (one token, then waits), or an
    answer of one token."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.stats = EngineStats()

    async def start(self) -> None: ...

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        try:
            if request.text == "too long":
                raise PromptTooLong(5000, 64)
            if request.text == "busy":
                raise EngineBusy("every slot is busy and 16 requests wait")
            yield TokenDelta("hi", 1)
            if request.text == "hang":
                await asyncio.sleep(30)
            yield Finished("stop", Usage(3, 1))
        finally:
            self.closed.set()

    async def embed(self, request: EmbedRequest) -> Embeddings:
        if request.inputs == ((999,),):
            raise InvalidGenerateRequest("input 0: token id 999 is outside", "input")
        return Embeddings(tuple((0.5, -0.5) for _ in request.inputs), 2 * len(request.inputs))

    async def wait_exited(self) -> int:
        return 0

    async def stop(self) -> None: ...


def _deps() -> HostDeps:
    def nothing(*args: object) -> Any:
        raise AssertionError("not started in these tests")

    return HostDeps(nothing, nothing, StageServer, 1, "127.0.0.1", Path("/nonexistent"),
                    False, False, restart_backoff_s=0.01)


def _worker(state: LoadState = LoadState.READY) -> tuple[Worker, ModelHost, ScriptedEngine]:
    config = cast(WorkerConfig, SimpleNamespace(
        worker_id="w1", advertise_address="127.0.0.1:1", backend="cpu", memory_budget_bytes=1,
        threads=1, load_publish_s=1.0))  # slot use is published, throttled
    worker = Worker(config, cast(Registration, _NoRegistration()), health.aio.HealthServicer(),
                    _deps(), cast(LinkMonitor, SimpleNamespace(published={})))
    host = ModelHost(HostPlan(SPEC, Role.WHOLE, 0, 1), _deps(), _nothing)
    engine = ScriptedEngine()
    host.engine, host.state = engine, ModelState(M, state)
    worker.hosts[M] = host
    return worker, host, engine


async def _nothing() -> None: ...


class _NoRegistration:
    async def publish(self, value: bytes) -> bool:
        return True


@contextlib.asynccontextmanager
async def serving(worker: Worker) -> AsyncIterator[worker_pb2_grpc.ShardWorkerStub]:
    server = grpc.aio.server()
    worker_pb2_grpc.add_ShardWorkerServicer_to_server(ShardWorkerServicer(worker), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield worker_pb2_grpc.ShardWorkerStub(channel)
    finally:
        await server.stop(None)


def _request(text: str, model: str = M) -> worker_pb2.GenerateRequest:
    return convert.generate_request_to_pb(
        GenerateRequest(RequestId("r1"), ModelId(model), text, None, SamplingParams()))


async def test_events_stream_and_the_worker_counts_tokens() -> None:
    worker, host, _ = _worker()
    async with serving(worker) as stub:
        events = [convert.event_from_pb(m) async for m in stub.Generate(_request("hello"))]
    assert events == [TokenDelta("hi", 1), Finished("stop", Usage(3, 1))]
    assert (worker.prompt_tokens, worker.generated_tokens, host.in_flight) == (3, 1, 0)
    assert worker.stats().generated_tokens_total == 1


@pytest.mark.parametrize(("text", "model", "state", "status", "expected"), [
    ("too long", M, LoadState.READY, grpc.StatusCode.INVALID_ARGUMENT, PromptTooLong(5000, 64)),
    ("busy", M, LoadState.READY, grpc.StatusCode.RESOURCE_EXHAUSTED,
     EngineBusy("every slot is busy and 16 requests wait")),
    ("hello", "other", LoadState.READY, grpc.StatusCode.UNAVAILABLE,
     EngineUnavailable("model other is not placed on this worker")),
    ("hello", M, LoadState.LOADING, grpc.StatusCode.UNAVAILABLE,
     EngineUnavailable("model m is loading on this worker")),
], ids=["prompt too long", "busy", "not placed", "loading"])
async def test_errors_travel_as_status_and_reason(
        text: str, model: str, state: LoadState, status: grpc.StatusCode,
        expected: MeshError) -> None:
    worker, host, _ = _worker(state)
    async with serving(worker) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(_request(text, model)):
                pass
    assert info.value.code() == status
    rebuilt = grpc_errors.error_from_rpc(info.value)
    assert type(rebuilt) is type(expected) and str(rebuilt) == str(expected)
    assert rebuilt.wire_details() == expected.wire_details()
    assert host.in_flight == 0 and worker.prompt_tokens == 0


async def test_a_caller_gone_mid_stream_frees_the_slot() -> None:
    worker, host, engine = _worker()
    async with serving(worker) as stub:
        call = stub.Generate(_request("hang"))
        assert (await call.read()).delta.text == "hi"
        assert host.in_flight == 1
        call.cancel()
        async with asyncio.timeout(5):
            await engine.closed.wait()
            while host.in_flight:
                await asyncio.sleep(0.01)
    assert worker.generated_tokens == 1  # counted as sent (the watchdog reads it), kept


async def test_tunnel_to_a_model_that_is_no_stage_here_is_refused() -> None:
    worker, _, _ = _worker()

    async def frames() -> AsyncIterator[worker_pb2.TunnelFrame]:
        yield worker_pb2.TunnelFrame(model_id=M)

    async with serving(worker) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Tunnel(frames()):
                pass
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    refused = grpc_errors.error_from_rpc(info.value)
    assert isinstance(refused, EngineUnavailable)
    assert str(refused) == "this worker serves no stage of 'm'"


async def test_embed_answers_vectors_and_errors_travel_as_their_reason() -> None:
    worker, host, _ = _worker()
    async with serving(worker) as stub:
        request = EmbedRequest(RequestId("e1"), M, ("a", (1, 2)))
        reply = await stub.Embed(convert.embed_request_to_pb(request))
        assert convert.embeddings_from_pb(reply) == Embeddings(((0.5, -0.5), (0.5, -0.5)), 4)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Embed(convert.embed_request_to_pb(
                EmbedRequest(RequestId("e2"), M, ((999,),))))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    refused = grpc_errors.error_from_rpc(info.value)
    assert isinstance(refused, InvalidGenerateRequest) and refused.param == "input"
    assert (worker.prompt_tokens, host.in_flight) == (4, 0)
