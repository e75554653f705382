"""The shard-worker service: follows placements, hosts models, serves Generate, carries
ggml RPC tunnels for its stages and measures its links to other workers."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator

import grpc
from grpc_health.v1 import health
from meshllm.common import convert, grpc_errors, grpcutil, telemetry
from meshllm.common.errors import EngineUnavailable, MeshError
from meshllm.common.membership import Registration
from meshllm.common.types import (
    Embeddings,
    EmbedRequest,
    Finished,
    GenerateEvent,
    GenerateRequest,
    LoadState,
    ModelId,
    WorkerId,
    WorkerInfo,
    WorkerStats,
)
from meshllm.v1 import worker_pb2, worker_pb2_grpc
from meshllm.worker.config import WorkerConfig
from meshllm.worker.hosts import HostDeps, ModelHost
from meshllm.worker.links import LinkMonitor
from meshllm.worker.metrics import WorkerMetrics
from meshllm.worker.plans import HostPlan, Role
from meshllm.worker.tunnel import pump_to_stage

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: WorkerConfig, registration: Registration,
                 health_servicer: health.aio.HealthServicer, deps: HostDeps,
                 links: LinkMonitor, metrics: WorkerMetrics | None = None) -> None:
        self.config = config
        self.worker_id = WorkerId(config.worker_id)
        self.hosts: dict[ModelId, ModelHost] = {}
        self.links = links
        self.metrics = metrics or WorkerMetrics()
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self._registration = registration
        self._health = health_servicer
        self._deps = deps
        self._started = time.time()

    def record(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id, address=self.config.advertise_address,
            backend=self.config.backend, memory_budget_bytes=self.config.memory_budget_bytes,
            threads=self.config.threads, started_at_unix_s=self._started,
            models=tuple(h.state for h in self.hosts.values()), rtt_ms=self.links.published,
            rpc_host=self._deps.stage_host if self._deps.direct_rpc else "",
        )

    async def publish(self) -> None:
        self.metrics.observe_states([h.state for h in self.hosts.values()])
        await self._registration.publish(convert.worker_to_pb(self.record()).SerializeToString())
        ready = bool(self.hosts) and all(
            h.state.state is LoadState.READY for h in self.hosts.values()
        )
        await self._health.set("", grpcutil.SERVING if ready else grpcutil.NOT_SERVING)

    async def apply(self, wanted: dict[ModelId, HostPlan]) -> None:
        """Start, restart or stop hosts so that they match the planner's wishes."""
        changed = False
        for model_id in list(self.hosts):
            if wanted.get(model_id) != self.hosts[model_id].plan:
                log.info("stopping %s (%s)", model_id, self.hosts[model_id].plan.role.value)
                await self.hosts.pop(model_id).stop()
                changed = True
        for model_id, plan in wanted.items():
            if model_id not in self.hosts:
                log.info("hosting %s as %s, layers %d-%d", model_id, plan.role.value,
                         plan.layer_start, plan.layer_end - 1)
                host = ModelHost(plan, self._deps, self.publish)
                self.hosts[model_id] = host
                host.start()
                changed = True
        if changed:
            await self.publish()

    def stage_port(self, model_id: str) -> int:
        host = self.hosts.get(ModelId(model_id))
        if host is None or host.plan.role is not Role.STAGE or host.stage is None:
            raise EngineUnavailable(f"this worker serves no stage of {model_id!r}")
        return host.stage.port

    async def generate(self, request: GenerateRequest,
                       tracer: telemetry.Tracer = telemetry.NO_TRACER
                       ) -> AsyncGenerator[GenerateEvent, None]:
        """The request's events from its model's engine, traced, measured and counted."""
        host = self.hosts.get(request.model_id)
        if host is None:
            raise EngineUnavailable(f"model {request.model_id} is not placed on this worker")
        host.in_flight += 1
        self.metrics.set_load(request.model_id, host.in_flight, host.spec.slots)
        try:
            events = telemetry.traced_generation(
                tracer, telemetry.worker_call(request, self.worker_id),
                host.ready_engine().generate(request))
            measured = self.metrics.observe(request.model_id, host.spec.context_length, events)
            async with contextlib.aclosing(measured):  # closed early: the engine stops now
                async for event in measured:
                    if isinstance(event, Finished):
                        self.generated_tokens += event.usage.completion_tokens
                        self.prompt_tokens += event.usage.prompt_tokens
                    yield event
        finally:
            host.in_flight -= 1
            self.metrics.set_load(request.model_id, host.in_flight, host.spec.slots)
            if host.engine is not None:
                self.metrics.set_engine(request.model_id, host.engine.stats)

    async def embed(self, request: EmbedRequest) -> Embeddings:
        """The inputs' vectors from their model's engine (a head of a split refuses)."""
        host = self.hosts.get(request.model_id)
        if host is None:
            raise EngineUnavailable(f"model {request.model_id} is not placed on this worker")
        host.in_flight += 1
        try:
            embeddings = await host.ready_engine().embed(request)
        finally:
            host.in_flight -= 1
        self.prompt_tokens += embeddings.prompt_tokens
        return embeddings

    def stats(self) -> WorkerStats:
        # Counted here, not from the engine's once-a-second reports, so they are current.
        running = sum(min(h.in_flight, h.spec.slots) for h in self.hosts.values())
        queued = sum(max(h.in_flight - h.spec.slots, 0) for h in self.hosts.values())
        return WorkerStats(self.worker_id, running, queued, self.generated_tokens,
                           self.prompt_tokens, tuple(h.state for h in self.hosts.values()))

    async def close(self) -> None:
        for host in self.hosts.values():
            await host.stop()
        self.hosts.clear()


class ShardWorkerServicer(worker_pb2_grpc.ShardWorkerServicer):
    """A thin adapter from gRPC to the Worker: converts messages, and ends a call that
    raised a mesh error with its status and reason code (grpc_errors)."""

    def __init__(self, worker: Worker, tracer: telemetry.Tracer = telemetry.NO_TRACER) -> None:
        self._worker = worker
        self._tracer = tracer

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        try:
            generate = convert.generate_request_from_pb(request)
        except MeshError as exc:
            await grpc_errors.abort(context, exc)
        events = self._worker.generate(generate, self._tracer)
        async with contextlib.aclosing(events):  # a caller gone mid-stream frees its slot now
            try:
                async for event in events:
                    yield convert.event_to_pb(event)
            except MeshError as exc:
                await grpc_errors.abort(context, exc)

    async def Embed(self, request: worker_pb2.EmbedRequest, context: grpc.aio.ServicerContext
                    ) -> worker_pb2.EmbedResponse:
        try:
            embeddings = await self._worker.embed(convert.embed_request_from_pb(request))
        except MeshError as exc:
            await grpc_errors.abort(context, exc)
        return convert.embeddings_to_pb(embeddings)

    async def GetStats(
        self, request: worker_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerStats:
        return convert.stats_to_pb(self._worker.stats())

    async def Ping(self, request: worker_pb2.PingRequest, context: grpc.aio.ServicerContext
                   ) -> worker_pb2.PingResponse:
        return worker_pb2.PingResponse(worker_id=self._worker.worker_id)

    async def Tunnel(
        self, request_iterator: AsyncIterator[worker_pb2.TunnelFrame],
        context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.TunnelFrame]:
        opening = await anext(request_iterator, None)
        if opening is None:  # the caller closed the tunnel before opening it
            return
        try:
            port = self._worker.stage_port(opening.model_id)
        except MeshError as exc:
            await grpc_errors.abort(context, exc)
        async for frame in pump_to_stage(request_iterator, port):
            yield frame
