"""The backend keeps what routing learns: against scripted workers on real gRPC servers,
a failed worker is banned, skipped, then probed once its ban is over; a conversation goes
back to the replica that served its last turn; and the counters say so."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, cast

import grpc
from meshllm.common import convert, grpc_errors
from meshllm.common.errors import EngineCrashed
from meshllm.common.meshview import MeshSnapshot
from meshllm.common.store import KeyValueStore
from meshllm.common.types import (
    ChatMessage,
    Finished,
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
from meshllm.gateway.bans import Health, health
from meshllm.gateway.config import StreamTiming
from meshllm.gateway.metrics import GatewayMetrics
from meshllm.gateway.openai_api import ApiRequest
from meshllm.v1 import worker_pb2, worker_pb2_grpc

M = ModelId("m")
W0, W1 = WorkerId("w0"), WorkerId("w1")


class Worker(worker_pb2_grpc.ShardWorkerServicer):
    def __init__(self) -> None:
        self.broken = False
        self.calls = 0

    async def Generate(self, request: worker_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext[Any, Any]
                       ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        self.calls += 1
        if self.broken:
            await grpc_errors.abort(context, EngineCrashed("exit code 134"))
        yield convert.event_to_pb(TokenDelta("x", 1))
        yield convert.event_to_pb(Finished("stop", Usage(2, 1)))


def snapshot(ports: list[int], running: tuple[int, ...] = (0, 0)) -> MeshSnapshot:
    infos = [WorkerInfo(WorkerId(f"w{i}"), f"127.0.0.1:{port}", "cpu", 1, 1, 0.0,
                        (ModelState(M, LoadState.READY, running=running[i], slots=4),))
             for i, port in enumerate(ports)]
    placement = Placement(M, tuple(whole(w.worker_id, 1) for w in infos), 1)
    return MeshSnapshot({w.worker_id: w for w in infos},
                        {M: ModelSpec(M, "m", 1, 1, 1, 1, "x", 1)}, {M: placement})


@contextlib.asynccontextmanager
async def mesh() -> AsyncIterator[tuple[MeshBackend, list[Worker], list[int], GatewayMetrics]]:
    servers, workers, ports = [], [], []
    for _ in range(2):
        server, worker = grpc.aio.server(), Worker()
        worker_pb2_grpc.add_ShardWorkerServicer_to_server(worker, server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        servers.append(server)
        workers.append(worker)
    metrics = GatewayMetrics()
    backend = MeshBackend(cast(KeyValueStore, object()), StreamTiming(2.0, 2.0),
                          routing_metrics=metrics.routing)
    backend.snapshot = snapshot(ports)
    try:
        yield backend, workers, ports, metrics
    finally:
        await backend.close()
        for server in servers:
            await server.stop(None)


def chat(*contents: str) -> ApiRequest:
    messages = tuple(ChatMessage("user" if i % 2 == 0 else "assistant", c)
                     for i, c in enumerate(contents))
    return ApiRequest("chat", "m", SamplingParams(max_tokens=1), False, False, chat=messages)


async def ask(backend: MeshBackend, request: ApiRequest) -> None:
    assert [type(e) async for e in backend.generate(request)] == [TokenDelta, Finished]


def count(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name + "_total", labels)
    return value or 0.0


def end_ban(backend: MeshBackend, worker_id: WorkerId) -> None:
    backend.loads[worker_id] = replace(backend.loads[worker_id], banned_until_s=0.0)


async def test_a_failed_worker_is_banned_then_probed_before_it_gets_traffic_again() -> None:
    async with mesh() as (backend, workers, _, metrics):
        workers[0].broken = True
        await ask(backend, chat("hi"))            # w0 fails, w1 answers
        await ask(backend, chat("hello"))         # w0 banned: not tried
        assert [w.calls for w in workers] == [1, 2]
        end_ban(backend, W0)
        await ask(backend, chat("hey"))           # the probe fails: banned twice as long
        state = backend.loads[W0]
        assert [w.calls for w in workers] == [2, 3] and state.strikes == 2
        assert state.banned_until_s - state.last_failure_at_s == 2.0
        workers[0].broken = False
        end_ban(backend, W0)
        await ask(backend, chat("good day"))      # the probe answers: w0 is back
        assert [w.calls for w in workers] == [3, 3]
        assert health(backend.loads[W0], 0.0) is Health.HEALTHY
        assert backend.loads[W0].in_flight == 0 and not backend.loads[W0].probing
        assert count(metrics, "meshllm_gateway_worker_bans", worker="w0") == 2
        assert count(metrics, "meshllm_gateway_worker_probes", worker="w0") == 2


async def test_a_conversation_goes_back_to_the_replica_that_holds_its_prefix() -> None:
    async with mesh() as (backend, workers, ports, metrics):
        backend.snapshot = snapshot(ports, running=(1, 0))  # w0 busier: turn 1 on w1
        await ask(backend, chat("What is a mesh?"))
        backend.snapshot = snapshot(ports, running=(0, 2))  # w1 busier, within the margin
        await ask(backend, chat("What is a mesh?", "A net.", "Of what?"))
        await ask(backend, chat("Something else"))          # a new one: least busy (w0)
        assert [w.calls for w in workers] == [1, 2]
        backend.snapshot = snapshot(ports, running=(0, 3))  # much busier: not worth it
        await ask(backend, chat("What is a mesh?", "A net.", "Of what?", "Nodes.", "And?"))
        assert [w.calls for w in workers] == [2, 2]
        assert {r: count(metrics, "meshllm_gateway_prefix_affinity", model="m", result=r)
                for r in ("hit", "miss", "busy")} == {"hit": 1, "miss": 2, "busy": 1}
