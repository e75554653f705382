"""The shard-worker service: follows placements, hosts models, serves Generate, carries
ggml RPC tunnels for its stages and measures its links to other workers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator

import grpc
from grpc_health.v1 import health
from meshllm.common import convert, convert_shards, grpc_errors, grpcutil, telemetry
from meshllm.common.errors import EngineUnavailable, MeshError
from meshllm.common.membership import Registration
from meshllm.common.meshview import MeshSnapshot
from meshllm.common.shard_transfer import ShardChunk, ShardRequest
from meshllm.common.types import (
    Embeddings,
    EmbedRequest,
    Finished,
    GenerateEvent,
    GenerateRequest,
    LoadState,
    ModelId,
    ModelState,
    TokenDelta,
    WorkerId,
    WorkerInfo,
    WorkerStats,
)
from meshllm.v1 import worker_pb2, worker_pb2_grpc
from meshllm.worker.config import WorkerConfig
from meshllm.worker.hosts import HostDeps, ModelHost
from meshllm.worker.inventory import Inventory
from meshllm.worker.links import LinkMonitor
from meshllm.worker.metrics import WorkerMetrics
from meshllm.worker.plans import DrainStep, Held, HostPlan, Role, drain_step, memory_wait
from meshllm.worker.shard_serve import shard_chunks
from meshllm.worker.shard_source import PeerHolding, peer_holdings
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
        self._drains: dict[ModelId, asyncio.Task[None]] = {}
        self._load_publish: asyncio.Task[None] | None = None
        self._last_load_publish = float("-inf")
        self._published: tuple[ModelState, ...] | None = None
        self.mesh = MeshSnapshot()  # the latest, for the models' specs and peers' records
        self.inventory = Inventory(deps.data_dir)

    def _states(self) -> tuple[ModelState, ...]:
        return tuple(h.published_state() for h in self.hosts.values())

    def record(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id, address=self.config.advertise_address,
            backend=self.config.backend, memory_budget_bytes=self.config.memory_budget_bytes,
            threads=self.config.threads, started_at_unix_s=self._started,
            models=self._states(), rtt_ms=self.links.published,
            rpc_host=self._deps.stage_host if self._deps.direct_rpc else "",
            model_files=self.inventory.model_files,
            expert_shards=self.inventory.expert_shards,
        )

    def observe(self, snapshot: MeshSnapshot) -> None:
        """Keeps the latest snapshot; the inventory checks again when the models changed."""
        if snapshot.models != self.mesh.models:
            self.inventory.wake()
        self.mesh = snapshot

    def shard_peers(self, model_digest: str, shard: str) -> list[PeerHolding]:
        """The other workers that can send this shard, as their records say now."""
        return peer_holdings(self.mesh.workers, self.worker_id, model_digest, shard,
                             self.links.published)

    def serve_shard(self, request: ShardRequest) -> AsyncIterator[ShardChunk]:
        """A shard for a peer lacking the model file; the inventory then lists it."""
        self.inventory.wake()
        return shard_chunks(self.mesh.models.get(request.model_id), request,
                            self._deps.data_dir)

    async def publish(self) -> None:
        for host in self.hosts.values():  # the links may have changed: heads' engines follow
            host.follow_links()
        record = self.record()
        self._published = record.models
        self.metrics.observe_states(list(record.models))
        await self._registration.publish(convert.worker_to_pb(record).SerializeToString())
        ready = bool(self.hosts) and all(
            h.state.state is LoadState.READY for h in self.hosts.values()
        )
        await self._health.set("", grpcutil.SERVING if ready else grpcutil.NOT_SERVING)

    async def apply(self, wanted: dict[ModelId, HostPlan]) -> None:
        """Start, restart, drain or stop hosts so that they match the planner's wishes."""
        changed = False
        for model_id in list(self.hosts):
            changed |= await self._follow(self.hosts[model_id], wanted.get(model_id))
        for model_id, plan in wanted.items():
            # A retiring replica this worker does not hold (it restarted, say) stays unloaded.
            if model_id not in self.hosts and not plan.retiring:
                self.hosts[model_id] = ModelHost(plan, self._deps, self.publish,
                                                 lambda: self.links.published,
                                                 self.shard_peers)
                changed = True
        changed |= self._start_waiting()
        if changed:
            await self.publish()

    async def _follow(self, host: ModelHost, plan: HostPlan | None) -> bool:
        """Brings one held host in line with its new plan; whether its state changed."""
        if not host.started and (plan is None or plan.retiring):
            await self._stop(host.spec.model_id)  # still waiting for memory: nothing to drain
            return True
        if plan is not None and (plan == host.plan or host.plan.differs_only_in_retiring(plan)):
            host.plan = plan
            if plan.retiring and not host.draining:
                self._drain(host, "retired")
                return True
            if host.draining and not plan.retiring:
                self._resume(host)
                return True
            return False
        # Gone from the placement: a whole model or a head with streams finishes them. A
        # stage goes at once: a retiring one's plan goes once its head unloaded (see
        # assigned_plans); a live replica dropped outright has no head left to wait for.
        if plan is None and host.plan.role is not Role.STAGE and (host.in_flight or
                                                                   host.draining):
            if not host.draining:
                self._drain(host, "gone from the placement")
                return True
            return False
        await self._stop(host.spec.model_id)
        return True

    def _drain(self, host: ModelHost, why: str) -> None:
        model_id = host.spec.model_id
        log.info("draining %s (%s, %s): %d streams in flight", model_id, host.plan.role.value,
                 why, host.in_flight)
        host.draining = True
        self._drains[model_id] = asyncio.create_task(self._drain_then_stop(host),
                                                     name=f"drain-{model_id}")

    def _resume(self, host: ModelHost) -> None:
        log.info("%s is no longer retiring: serving again", host.spec.model_id)
        host.draining = False
        task = self._drains.pop(host.spec.model_id, None)
        if task is not None:
            task.cancel()

    async def _drain_then_stop(self, host: ModelHost) -> None:
        loop = asyncio.get_running_loop()
        grace, timeout = self.config.drain_grace_s, self.config.drain_timeout_s
        began = idle_since = loop.time()
        while True:
            now = loop.time()
            if host.in_flight:
                idle_since = now
            step = drain_step(host.plan.role, host.in_flight, now - idle_since, now - began,
                              grace, timeout)
            if step is not DrainStep.KEEP:
                break
            await asyncio.sleep(min(0.05, grace / 4))
        model_id = host.spec.model_id
        if step is DrainStep.CUT:
            self.metrics.drain_cut_streams.labels(model_id).inc(host.in_flight)
            log.warning("%s drained for %.0fs (drain timeout): stopping it cuts %s", model_id,
                        now - began, "its head's streams, if any" if host.plan.role is
                        Role.STAGE else f"{host.in_flight} streams")
        self._drains.pop(model_id, None)
        if self.hosts.get(model_id) is host:
            await self._stop(model_id)
            self._start_waiting()
            await self.publish()

    async def _stop(self, model_id: ModelId) -> None:
        host = self.hosts.pop(model_id)
        drain = self._drains.pop(model_id, None)
        if drain is not None and drain is not asyncio.current_task():
            drain.cancel()
        log.info("stopping %s (%s)", model_id, host.plan.role.value)
        await host.stop()

    def _start_waiting(self) -> bool:
        """Starts the hosts waiting for memory that now fit; whether any state changed."""
        changed = False
        for host in self.hosts.values():
            if host.started:
                continue
            held = [Held(h.spec.model_id, h.plan.required_bytes, h.draining)
                    for h in self.hosts.values() if h.started]
            why = memory_wait(self.config.memory_budget_bytes, held, host.plan.required_bytes)
            if why:
                changed |= host.state.phase != why
                host.wait_for_memory(why)
                continue
            log.info("hosting %s as %s, layers %d-%d", host.spec.model_id, host.plan.role.value,
                     host.plan.layer_start, host.plan.layer_end - 1)
            host.start()
            changed = True
        return changed

    def _load_changed(self) -> None:
        """Publishes slot use at most once per load_publish_s, the last change included."""
        if self._load_publish is not None:
            return  # the one scheduled reads the load when it runs
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._last_load_publish + self.config.load_publish_s - loop.time())
        self._load_publish = loop.create_task(self._publish_load(delay), name="publish-load")

    async def _publish_load(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self._last_load_publish = asyncio.get_running_loop().time()
        self._load_publish = None
        if self._states() != self._published:
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
        self._load_changed()
        try:
            events = telemetry.traced_generation(
                tracer, telemetry.worker_call(request, self.worker_id),
                host.ready_engine().generate(request))
            measured = self.metrics.observe(request.model_id, host.spec.context_length, events)
            async with contextlib.aclosing(measured):  # closed early: the engine stops now
                async for event in measured:
                    # Tokens are counted as they come: the gateway's watchdog reads the
                    # count to tell an engine that decodes from one that hangs.
                    if isinstance(event, TokenDelta):
                        self.generated_tokens += event.tokens
                    elif isinstance(event, Finished):
                        self.prompt_tokens += event.usage.prompt_tokens
                    yield event
        finally:
            host.in_flight -= 1
            self.metrics.set_load(request.model_id, host.in_flight, host.spec.slots)
            self._load_changed()
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
                           self.prompt_tokens, self._states())

    async def close(self) -> None:
        for task in (*self._drains.values(), self._load_publish):
            if task is not None:
                task.cancel()
        self._drains.clear()
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

    async def FetchShard(self, request: worker_pb2.FetchShardRequest,
                         context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[worker_pb2.ShardChunk]:
        try:
            chunks = self._worker.serve_shard(convert_shards.shard_request_from_pb(request))
            async for chunk in chunks:
                yield convert_shards.shard_chunk_to_pb(chunk)
        except MeshError as exc:
            await grpc_errors.abort(context, exc)
