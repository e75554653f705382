"""The gateway's backend against scripted workers on real gRPC servers: which worker
errors it retries elsewhere, which it passes on, and the domain error it raises."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
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
    Assignment,
    Finished,
    GenerateEvent,
    GenerateRequest,
    LoadState,
    ModelId,
    ModelSpec,
    ModelState,
    Placement,
    Replica,
    Resume,
    SamplingParams,
    TokenDelta,
    Usage,
    WorkerId,
    WorkerInfo,
    whole,
)
from meshllm.gateway.backend import MeshBackend
from meshllm.gateway.config import StreamTiming
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
    refuse_first: MeshError | None = None  # the first call only: refused with this
    hang: bool = False  # after its tokens: no more, while GetStats says it is decoding
    hang_once: bool = False  # hang on the first call only (slow steps after a re-plan)
    fail_once: bool = False  # the error on the first call only
    holds_none: bool = False  # GetStats answers, counting no request (the call was lost)


class ScriptedWorker(worker_pb2_grpc.ShardWorkerServicer):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.calls = 0
        self.requests: list[GenerateRequest] = []

    async def Generate(self, request: worker_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext[Any, Any]
                       ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        self.calls += 1
        self.requests.append(convert.generate_request_from_pb(request))
        if self.script.refuse_first is not None and self.calls == 1:
            await grpc_errors.abort(context, self.script.refuse_first)
        for i in range(self.script.tokens):
            yield convert.event_to_pb(TokenDelta("x", 1, sent_ids=(100 + i,), draws=i + 1))
        if self.script.error is not None and not (self.script.fail_once and self.calls > 1):
            await grpc_errors.abort(context, self.script.error)
        if self.script.no_reason:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        if self.script.silent or (self.script.hang and not (
                self.script.hang_once and self.calls > 1)):
            await asyncio.sleep(30)
        yield convert.event_to_pb(Finished("stop", Usage(2, self.script.tokens)))


    async def GetStats(self, request: worker_pb2.GetStatsRequest,
                       context: grpc.aio.ServicerContext[Any, Any]) -> worker_pb2.WorkerStats:
        if self.script.holds_none:
            return worker_pb2.WorkerStats(running_requests=0, generated_tokens_total=7)
        if not self.script.hang:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not scripted")
        return worker_pb2.WorkerStats(running_requests=1, generated_tokens_total=7)


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
    backend = MeshBackend(cast(KeyValueStore, object()), StreamTiming(0.5, 0.5))
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
    (Script(error=EngineUnavailable("model m is loading on this worker")), set()),
    (Script(no_reason=True), {"w0"}),
], ids=["busy: no mark", "crashed", "unavailable for now: no mark", "transport failure"])
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


async def test_failure_after_the_first_token_moves_the_stream_to_another_replica() -> None:
    async with mesh(Script(tokens=1, error=EngineCrashed("exit code 134")), OK) as (
            backend, workers):
        seen = await _events(backend)
        assert [w.calls for w in workers] == [1, 1]
        assert workers[0].requests[0].resume is None
        assert workers[1].requests[0].resume == Resume((100,), 1, 1)
    assert [type(e).__name__ for e in seen] == ["TokenDelta"] * 3 + ["Finished"]
    assert _marked_failed(backend) == {"w0"}


async def test_a_replica_that_refuses_a_moving_stream_for_now_is_asked_again() -> None:
    """Loading (the snapshot said ready) is not broken: it takes the stream once ready."""
    loading = Script(tokens=2, refuse_first=EngineUnavailable("gemma is loading"))
    async with mesh(Script(tokens=1, error=EngineCrashed("exit code 134")), loading) as (
            backend, workers):
        seen = await _events(backend)
        assert [w.calls for w in workers] == [1, 2]
        assert workers[1].requests[1].resume == Resume((100,), 1, 1)  # a refusal: no move
    assert [type(e).__name__ for e in seen] == ["TokenDelta"] * 3 + ["Finished"]


async def test_a_stream_its_worker_stopped_for_now_moves_without_a_mark() -> None:
    """A lone split's head stops its engine for a re-plan while it streams: not the
    worker's fault (no mark, asked again after a rest), but the stream has moved, so the
    resumption counts one move (a worker refuses a resume that has not moved)."""
    stopped = EngineUnavailable("the engine of m was stopped while it ran this request")
    async with mesh(Script(tokens=1, error=stopped, fail_once=True)) as (backend, workers):
        backend.timing = replace(backend.timing, migrate_wait_s=5)
        seen = await _events(backend)
        assert workers[0].calls == 2 and workers[0].requests[1].resume == Resume((100,), 1, 1)
    assert [type(e).__name__ for e in seen] == ["TokenDelta"] * 2 + ["Finished"]
    assert _marked_failed(backend) == set()


async def test_a_worker_that_answers_but_makes_no_tokens_loses_its_stream() -> None:
    """An engine that hangs under a live worker: probes are answered, but the worker's
    token count stands still while it claims to decode; the stream moves long before the
    token timeout."""
    async with mesh(Script(tokens=1, hang=True), OK) as (backend, workers):
        backend.timing = replace(backend.timing, token_timeout_s=30, stall_probe_s=0.05)
        seen = await _events(backend)
        assert [w.calls for w in workers] == [1, 1]
        assert workers[1].requests[0].resume == Resume((100,), 1, 1)
    assert [type(e).__name__ for e in seen] == ["TokenDelta"] * 3 + ["Finished"]
    moved = backend.routing_metrics.migrations.labels("m", "silent")._value.get()
    assert moved == 1  # found silent by the watchdog (the token timeout would be 30 s)


@pytest.mark.parametrize("tokens", [0, 1], ids=["before its first token", "mid-stream"])
async def test_a_worker_that_answers_but_holds_no_request_loses_the_call(
        tokens: int, caplog: pytest.LogCaptureFixture) -> None:
    """A call lost inside a live worker (its engine was stopped under it): the worker
    answers probes but counts no request, so the call is given up after a few probes,
    not after the first-token timeout (a resumed stream waited 600 s for one)."""
    async with mesh(Script(tokens=tokens, silent=True, holds_none=True), OK) as (
            backend, workers):
        backend.timing = replace(backend.timing, first_token_timeout_s=30,
                                 token_timeout_s=30, stall_probe_s=0.05)
        seen = await _events(backend)
        assert [w.calls for w in workers] == [1, 1]
    assert [type(e).__name__ for e in seen] == ["TokenDelta"] * (tokens + 2) + ["Finished"]
    assert "worker w0 sent nothing for" in caplog.text
    assert "(it answers, but holds no request)" in caplog.text


async def test_a_lone_replica_that_answered_while_stuck_gets_its_stream_back() -> None:
    """A lone split whose first steps after a re-plan were slow: it answered the probes,
    so it is alive; with no other replica it is asked again (after a rest) instead of the
    stream waiting for another and failing."""
    async with mesh(Script(tokens=1, hang=True, hang_once=True)) as (backend, workers):
        backend.timing = replace(backend.timing, token_timeout_s=30, stall_probe_s=0.05,
                                 migrate_wait_s=5)
        seen = await _events(backend)
        assert workers[0].calls == 2 and workers[0].requests[1].resume == Resume((100,), 1, 1)
        # under an id of its own: the stuck attempt may still be running there
        first, again = (r.request_id for r in workers[0].requests)
        assert again == f"{first}-resume1"
    assert [type(e).__name__ for e in seen] == ["TokenDelta"] * 2 + ["Finished"]


def _split_on(backend: MeshBackend, *workers: str) -> None:
    stages = tuple(Assignment(WorkerId(w), i, i + 1) for i, w in enumerate(workers))
    backend.snapshot = replace(backend.snapshot, placements={
        M: Placement(M, (Replica(stages),), 1)})


async def test_a_split_re_planned_before_its_failure_arrives_takes_the_stream_back() -> None:
    """The planner moved the split off a frozen stage before the head's failure reached
    the gateway: the new split (same head) is not the one that failed, so it is asked."""
    class Replanned(ScriptedWorker):
        async def Generate(self, request: worker_pb2.GenerateRequest,
                           context: grpc.aio.ServicerContext[Any, Any]
                           ) -> AsyncIterator[worker_pb2.GenerateResponse]:
            if self.calls == 0:
                _split_on(backend, "w0", "w2")  # while the stream runs on w0 + w1
            async for reply in super().Generate(request, context):
                yield reply

    async with mesh(Script(tokens=1, error=EngineCrashed("exit code -9"), fail_once=True),
                    OK, OK) as (backend, workers):
        _split_on(backend, "w0", "w1")
        head = Replanned(workers[0].script)
        server = grpc.aio.server()
        worker_pb2_grpc.add_ShardWorkerServicer_to_server(head, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        w0 = replace(backend.snapshot.workers[WorkerId("w0")], address=f"127.0.0.1:{port}")
        backend.snapshot = replace(backend.snapshot, workers={
            **backend.snapshot.workers, w0.worker_id: w0})
        backend.timing = replace(backend.timing, migrate_wait_s=5)
        seen = await _events(backend)
        await server.stop(None)
    assert head.calls == 2 and head.requests[1].resume == Resume((100,), 1, 1)
    assert [type(e).__name__ for e in seen] == ["TokenDelta"] * 2 + ["Finished"]


async def test_a_stream_moves_at_most_max_migrations_times() -> None:
    failing = Script(tokens=1, error=EngineCrashed("exit code 134"))
    async with mesh(failing, failing, OK) as (backend, workers):
        backend.timing = replace(backend.timing, max_migrations=1)
        seen: list[GenerateEvent] = []
        with pytest.raises(StreamBroken) as info:
            async for event in backend.generate(REQUEST):
                seen.append(event)
        assert len(seen) == 2 and [w.calls for w in workers] == [1, 1, 0]
        assert workers[1].requests[0].resume == Resume((100,), 1, 1)
    assert str(info.value) == ("worker w1: UNAVAILABLE exit code 134 after the stream began "
                               "(moved 1 times already)")


async def test_a_stream_with_no_replica_left_ends_with_an_error() -> None:
    async with mesh(Script(tokens=1, error=EngineCrashed("exit code 134"))) as (backend, _):
        backend.timing = replace(backend.timing, migrate_wait_s=0.2)
        with pytest.raises(StreamBroken, match="no replica could carry the stream on"):
            await _events(backend)


async def test_a_silent_worker_times_out() -> None:
    async with mesh(Script(silent=True)) as (backend, _):
        with pytest.raises(WorkerSilent) as info:
            await _events(backend)
    assert str(info.value) == "worker w0 sent nothing for 0.5 s"


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
