"""The shard-worker service: follows placements, hosts models, serves Generate."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health
from meshllm.common import convert, grpcutil
from meshllm.common.errors import EngineUnavailable, InvalidGenerateRequest
from meshllm.common.membership import Registration
from meshllm.common.meshview import MeshSnapshot
from meshllm.common.types import (
    Finished,
    LoadState,
    ModelId,
    ModelSpec,
    WorkerId,
    WorkerInfo,
    WorkerStats,
)
from meshllm.v1 import worker_pb2, worker_pb2_grpc
from meshllm.worker.config import WorkerConfig
from meshllm.worker.hosts import EngineFactory, ModelHost

log = logging.getLogger(__name__)


def assigned_models(snapshot: MeshSnapshot, worker_id: WorkerId) -> dict[ModelId, ModelSpec]:
    """The models the planner placed on this worker (and whose spec is known)."""
    return {
        model_id: snapshot.models[model_id]
        for model_id, placement in snapshot.placements.items()
        if worker_id in placement.worker_ids and model_id in snapshot.models
    }


class Worker:
    def __init__(self, config: WorkerConfig, registration: Registration,
                 health_servicer: health.aio.HealthServicer, factory: EngineFactory) -> None:
        self.config = config
        self.worker_id = WorkerId(config.worker_id)
        self.hosts: dict[ModelId, ModelHost] = {}
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self._registration = registration
        self._health = health_servicer
        self._factory = factory
        self._started = time.time()

    def record(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id, address=self.config.advertise_address,
            backend=self.config.backend, memory_budget_bytes=self.config.memory_budget_bytes,
            threads=self.config.threads, started_at_unix_s=self._started,
            models=tuple(h.state for h in self.hosts.values()),
        )

    async def publish(self) -> None:
        await self._registration.publish(convert.worker_to_pb(self.record()).SerializeToString())
        ready = bool(self.hosts) and all(
            h.state.state is LoadState.READY for h in self.hosts.values()
        )
        await self._health.set("", grpcutil.SERVING if ready else grpcutil.NOT_SERVING)

    async def apply(self, wanted: dict[ModelId, ModelSpec]) -> None:
        changed = False
        for model_id in list(self.hosts):
            if wanted.get(model_id) != self.hosts[model_id].spec:
                log.info("unloading %s", model_id)
                await self.hosts.pop(model_id).stop()
                changed = True
        for model_id, spec in wanted.items():
            if model_id not in self.hosts:
                log.info("loading %s (%s)", model_id, spec.source)
                host = ModelHost(spec, self.config.threads, self._factory, self.publish,
                                 self.config.restart_backoff_s)
                self.hosts[model_id] = host
                host.start()
                changed = True
        if changed:
            await self.publish()

    def stats(self) -> WorkerStats:
        running = sum(min(h.in_flight, 1) for h in self.hosts.values())
        queued = sum(max(h.in_flight - 1, 0) for h in self.hosts.values())
        return WorkerStats(self.worker_id, running, queued, self.generated_tokens,
                           self.prompt_tokens, tuple(h.state for h in self.hosts.values()))

    async def close(self) -> None:
        for host in self.hosts.values():
            await host.stop()
        self.hosts.clear()


class ShardWorkerServicer(worker_pb2_grpc.ShardWorkerServicer):
    """A thin adapter from gRPC to the Worker; errors become status codes here."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        req = convert.generate_request_from_pb(request)
        host = self._worker.hosts.get(req.model_id)
        if host is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"model {req.model_id} is not placed on this worker")
        assert host is not None
        host.in_flight += 1
        try:
            async for event in host.ready_engine().generate(req):
                if isinstance(event, Finished):
                    self._worker.generated_tokens += event.usage.completion_tokens
                    self._worker.prompt_tokens += event.usage.prompt_tokens
                yield convert.event_to_pb(event)
        except InvalidGenerateRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except EngineUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        finally:
            host.in_flight -= 1

    async def GetStats(
        self, request: worker_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerStats:
        return convert.stats_to_pb(self._worker.stats())

    async def LoadModel(
        self, request: worker_pb2.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.LoadModelResponse:
        spec = convert.model_spec_from_pb(request.spec)
        wanted = {m: h.spec for m, h in self._worker.hosts.items()}
        await self._worker.apply({**wanted, spec.model_id: spec})
        state = self._worker.hosts[spec.model_id].state
        return worker_pb2.LoadModelResponse(state=convert.model_state_to_pb(state))

    async def UnloadModel(
        self, request: worker_pb2.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.UnloadModelResponse:
        wanted = {m: h.spec for m, h in self._worker.hosts.items() if m != request.model_id}
        await self._worker.apply(wanted)
        return worker_pb2.UnloadModelResponse()

