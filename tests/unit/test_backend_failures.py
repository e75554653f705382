"""The gateway's backend against scripted workers on real gRPC servers: which worker
errors it retries elsewhere, which it passes on, and the domain error it raises."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import grpc
import pytest
from meshllm.common import convert, grpc_errors
from meshllm.common.errors import (
    EngineBusy,
    EngineCrashed,
    EngineUnavailable,
    InvalidGenerateRequest,
    MeshError,
    PromptTooLong,
)
from meshllm.common.meshview import MeshSnapshot
from meshllm.common.store import KeyValueStore
from meshllm.common.types import (
    Finished,
    GenerateEvent,
    LoadState,
    ModelId,
    ModelSpec,
    ModelState,
    Placement,
    SamplingParams,
    TokenDelta,
    Usage,
    WorkerId,
    WorkerInfo,
    whole,
)
from meshllm.gateway.backend import MeshBackend
from meshllm.gateway.failures import (
    NoLiveWorker,
    ReplicasBusy,
    ReplicasFailed,
    StreamBroken,
    UnknownModel,
    WorkerSilent,
)
from meshllm.gateway.openai_api import ApiRequest
from meshllm.v1 import worker_pb2, worker_pb2_grpc

M = ModelId("m")
REQUEST = ApiRequest("completion", "m", SamplingParams(max_tokens=4), False, False, text="hi")


@dataclass(frozen=True)
class Script:
    """What a scripted worker does with a Generate call: send `tokens` deltas, then fail
    with `error`, drop the call without a reason, go silent, or finish."""

    tokens: int = 0
    error: MeshError | None = None
    no_reason: bool = False
    silent: bool = False


class ScriptedWorker(worker_pb2_grpc.ShardWorkerServicer):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.calls = 0

    async def Generate(self, request: worker_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext[Any, Any]
                       ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        self.calls += 1
        for _ in range(self.script.tokens):
            yield convert.event_to_pb(TokenDelta("x", 1))
        if self.script.error is not None:
            await grpc_errors.abort(context, self.script.error)
        if self.script.no_reason:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        if self.script.silent:
            await asyncio.sleep(30)
        yield convert.event_to_pb(Finished("stop", Usage(2, self.script.tokens)))


@contextlib.asynccontextmanager
async def mesh(*scripts: Script) -> AsyncIterator[tuple[MeshBackend, list[ScriptedWorker]]]:
    """A backend whose snapshot lists one ready replica per script, named w0, w1, ..."""
    servers, workers, infos = [], [], []
    for i, script in enumerate(scripts):
        server = grpc.aio.server()
        worker = ScriptedWorker(script)
        worker_pb2_grpc.add_ShardWorkerServicer_to_server(worker, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        workers.append(worker)
        infos.append(WorkerInfo(WorkerId(f"w{i}"), f"127.0.0.1:{port}", "cpu", 1, 1, 0.0,
                                (ModelState(M, LoadState.READY),)))
    backend = MeshBackend(cast(KeyValueStore, object()), 0.5, 0.5)
    spec = ModelSpec(M, "m", 1, 1, 1, 1, "x", 1)
    placement = Placement(M, tuple(whole(w.worker_id, 1) for w in infos), 1)
    backend.snapshot = MeshSnapshot({w.worker_id: w for w in infos}, {M: spec}, {M: placement})
    try:
        yield backend, workers
    finally:
        await backend.close()
        for server in servers:
            await server.stop(None)


async def _events(backend: MeshBackend, request: ApiRequest = REQUEST) -> list[GenerateEvent]:
    return [event async for event in backend.generate(request)]


def _marked_failed(backend: MeshBackend) -> set[str]:
    return {w for w, load in backend.loads.items() if load.last_failure_at_s > 0}


OK = Script(tokens=2)
BUSY = Script(error=EngineBusy("queue full"))
CRASHED = Script(error=EngineCrashed("exit code 134"))


@pytest.mark.parametrize(("error", "raised"), [
    (PromptTooLong(5000, 4096), PromptTooLong),
    (InvalidGenerateRequest("stop must be text"), InvalidGenerateRequest),
], ids=["prompt too long", "invalid request"])
async def test_a_wrong_request_is_passed_on_untried_elsewhere(
        error: MeshError, raised: type[MeshError]) -> None:
    async with mesh(Script(error=error), OK) as (backend, workers):
        with pytest.raises(raised) as info:
            await _events(backend)
        assert type(info.value) is raised and str(info.value) == str(error)
        assert [w.calls for w in workers] == [1, 0]
        assert _marked_failed(backend) == set()


@pytest.mark.parametrize(("first", "marked"), [
    (BUSY, set()),
    (CRASHED, {"w0"}),
    (Script(error=EngineUnavailable("model m is loading on this worker")), {"w0"}),
    (Script(no_reason=True), {"w0"}),
], ids=["busy: no mark", "crashed", "unavailable", "transport failure"])
async def test_next_replica_answers_when_one_fails_before_its_first_token(
        first: Script, marked: set[str]) -> None:
    async with mesh(first, OK) as (backend, workers):
        events = await _events(backend)
        assert [type(e) for e in events] == [TokenDelta, TokenDelta, Finished]
        assert [w.calls for w in workers] == [1, 1]
        assert _marked_failed(backend) == marked


async def test_every_replica_busy_is_overloaded() -> None:
    async with mesh(BUSY, BUSY) as (backend, _):
        with pytest.raises(ReplicasBusy) as info:
            await _events(backend)
    assert "is busy" in str(info.value) and "Retry" in str(info.value)
    assert "w0: RESOURCE_EXHAUSTED queue full" in str(info.value)
    assert _marked_failed(backend) == set()


async def test_every_replica_failed() -> None:
    async with mesh(BUSY, CRASHED) as (backend, _):
        with pytest.raises(ReplicasFailed) as info:
            await _events(backend)
    assert "every replica of m failed" in str(info.value)
    assert "w1: UNAVAILABLE exit code 134" in str(info.value)
    assert _marked_failed(backend) == {"w1"}


async def test_failure_after_the_first_token_breaks_the_stream() -> None:
    async with mesh(Script(tokens=1, error=EngineCrashed("exit code 134")), OK) as (
            backend, workers):
        seen: list[GenerateEvent] = []
        with pytest.raises(StreamBroken) as info:
            async for event in backend.generate(REQUEST):
                seen.append(event)
        assert len(seen) == 1 and [w.calls for w in workers] == [1, 0]
    assert str(info.value) == "worker w0: UNAVAILABLE exit code 134 after the stream began"
    assert _marked_failed(backend) == {"w0"}


async def test_a_silent_worker_times_out() -> None:
    async with mesh(Script(silent=True)) as (backend, _):
        with pytest.raises(WorkerSilent) as info:
            await _events(backend)
    assert str(info.value) == "worker w0 sent nothing for 0s"


async def test_a_silent_worker_before_its_first_token_is_passed_over() -> None:
    async with mesh(Script(silent=True), OK) as (backend, workers):
        events = await _events(backend)
        assert events and [w.calls for w in workers] == [1, 1]
    assert _marked_failed(backend) == {"w0"}


async def test_unknown_model_and_no_live_worker() -> None:
    async with mesh() as (backend, _):
        with pytest.raises(UnknownModel) as unknown:
            await _events(backend, ApiRequest("completion", "gpt-9", SamplingParams(), False,
                                              False, text="hi"))
        with pytest.raises(NoLiveWorker) as none:
            await _events(backend)
    assert unknown.value.served == ("m",)
    assert "no live worker serves m right now" in str(none.value)
