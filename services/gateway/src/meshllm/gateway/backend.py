"""The mesh as the gateway sees it: placements from etcd, gRPC calls to workers,
retries on another replica when a worker fails before its first token.

Failures are raised as typed mesh errors (gateway.failures, or the worker's own error
rebuilt from its reason code); only the HTTP edge turns them into status codes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import Any

import grpc
from meshllm.common import convert, grpc_errors, telemetry
from meshllm.common.errors import InvalidGenerateRequest, MeshError, Overloaded
from meshllm.common.grpcutil import KEEPALIVE_CLIENT
from meshllm.common.meshview import MeshSnapshot, follow_mesh
from meshllm.common.store import KeyValueStore
from meshllm.common.tls import PLAINTEXT, GrpcSecurity
from meshllm.common.types import (
    Embeddings,
    EmbedInput,
    EmbedRequest,
    Finished,
    GenerateEvent,
    GenerateRequest,
    ModelId,
    RequestId,
    TokenDelta,
    WorkerId,
    WorkerInfo,
)
from meshllm.gateway.affinity import PrefixTable, prefix_keys
from meshllm.gateway.bans import on_dispatch, on_failure, on_return, on_success
from meshllm.gateway.choices import Traced, generate_request, merged
from meshllm.gateway.cold_start import wait_for_replicas
from meshllm.gateway.demand import DemandMeter
from meshllm.gateway.failures import (
    NoLiveWorker,
    ReplicasBusy,
    ReplicasFailed,
    StreamBroken,
    UnknownModel,
    WorkerSilent,
)
from meshllm.gateway.metrics import RoutingMetrics
from meshllm.gateway.openai_api import ApiRequest
from meshllm.gateway.routing import (
    Decision,
    RequestKey,
    RouteStats,
    WorkerLoad,
    decide,
    ready_replicas,
    serves_embeddings,
    serving_state,
    why_unavailable,
)
from meshllm.v1 import worker_pb2_grpc

log = logging.getLogger(__name__)

EMBED_SEQS_PER_DECODE = 64  # inputs a worker embeds in one decode at most (sizes timeouts)


def _untraced(events: AsyncGenerator[GenerateEvent, None]
              ) -> AsyncGenerator[GenerateEvent, None]:
    return events


class MeshBackend:
    def __init__(self, kv: KeyValueStore, first_token_timeout_s: float,
                 token_timeout_s: float, tracer: telemetry.Tracer = telemetry.NO_TRACER,
                 interceptors: Sequence[Any] = (), security: GrpcSecurity = PLAINTEXT,
                 cold_start_wait_s: float = 0.0, demand: DemandMeter | None = None,
                 routing_metrics: RoutingMetrics | None = None) -> None:
        self.snapshot = MeshSnapshot()
        self.demand = demand if demand is not None else DemandMeter()
        self._mesh_changed = asyncio.Event()  # set, then replaced, at every new snapshot
        self._cold_start_wait_s = cold_start_wait_s  # a request's wait for a first replica
        self._security = security
        self.synced = asyncio.Event()
        self.loads: dict[WorkerId, WorkerLoad] = {}  # updated by bans.on_* only
        self.prefixes = PrefixTable()  # which replica last served each prompt prefix
        self.routing_metrics = routing_metrics if routing_metrics is not None else (
            RoutingMetrics())
        self._kv = kv
        self._first_timeout_s = first_token_timeout_s
        self._token_timeout_s = token_timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tracer = tracer
        self._interceptors = list(interceptors)  # they carry the trace context to workers

    async def follow(self) -> None:
        async for snapshot in follow_mesh(self._kv):
            self.snapshot = snapshot
            self.synced.set()
            self._mesh_changed.set()
            self._mesh_changed = asyncio.Event()
            await self._drop_stale_channels()

    async def _drop_stale_channels(self) -> None:
        live = {w.address for w in self.snapshot.workers.values()}
        for address in list(self._channels.keys() - live):
            await self._channels.pop(address).close()

    def _stub(self, address: str) -> worker_pb2_grpc.ShardWorkerStub:
        if address not in self._channels:
            self._channels[address] = self._security.channel(
                address, options=KEEPALIVE_CLIENT, interceptors=self._interceptors)
        return worker_pb2_grpc.ShardWorkerStub(self._channels[address])

    def resolve(self, model: str) -> ModelId:
        """A model described or declared (not yet described, it may come up)."""
        known = self.snapshot.models.keys() | self.snapshot.declarations.keys()
        if model in known:
            return ModelId(model)
        raise UnknownModel(model, sorted(known))

    async def _next_change(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._mesh_changed.wait(), timeout_s)

    async def wait_until(self, check: Callable[[MeshSnapshot], bool], timeout_s: float) -> bool:
        """Whether the snapshot passes `check` within `timeout_s` (e.g. shows what this
        gateway has just written to etcd)."""
        deadline = time.monotonic() + timeout_s
        while not check(self.snapshot):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await self._next_change(left)
        return True

    def _load(self, worker: WorkerInfo) -> WorkerLoad:
        return self.loads.get(worker.worker_id, WorkerLoad())

    def _dispatched(self, worker: WorkerInfo) -> bool:
        """A call starts on `worker`; whether it is the probe that may end its ban."""
        state, probe = on_dispatch(self._load(worker), time.monotonic())
        self.loads[worker.worker_id] = state
        if probe:
            log.info("probing worker %s after its ban", worker.worker_id)
            self.routing_metrics.probed(worker.worker_id)
        return probe

    def _returned(self, worker: WorkerInfo, probe: bool) -> None:
        self.loads[worker.worker_id] = on_return(self._load(worker), probe)

    def _answered(self, worker: WorkerInfo) -> None:
        self.loads[worker.worker_id] = on_success(self._load(worker), time.monotonic())

    def _broke(self, worker: WorkerInfo) -> None:
        state = on_failure(self._load(worker), time.monotonic())
        self.loads[worker.worker_id] = state
        self.routing_metrics.banned(worker.worker_id)
        log.info("worker %s banned for %.0f s (failure %d in a row)", worker.worker_id,
                 state.banned_until_s - state.last_failure_at_s, state.strikes)

    def _decide(self, key: RequestKey, replicas: Sequence[WorkerInfo]) -> Decision:
        return decide(key, replicas, RouteStats(self.loads, self.prefixes), time.monotonic())

    async def _candidates(self, model_id: ModelId, whole_only: bool = False,
                          prefixes: tuple[int, ...] = ()) -> list[WorkerInfo]:
        """Ready replicas in the order to try them; waits a while for one to come up."""
        started = time.monotonic()
        def ready() -> list[WorkerInfo]:
            return ready_replicas(self.snapshot, model_id, whole_only)

        cold = not ready()  # counted as waiting for a cold start while it waits
        with self.demand.waiting(model_id) if cold else contextlib.nullcontext():
            replicas = await wait_for_replicas(
                ready, lambda: serving_state(self.snapshot, model_id)[0], self._next_change,
                self._cold_start_wait_s)
        if (waited := time.monotonic() - started) > 0.1:
            log.info("a request for %s waited %.1f s for a replica (%s)", model_id, waited,
                     "one came up" if replicas else "none came up")
        decision = self._decide(RequestKey(model_id, prefixes), replicas)
        self.routing_metrics.routed(model_id, decision.affinity.value)
        candidates = list(decision.order)
        telemetry.record_route(self._tracer, model_id, [w.worker_id for w in candidates])
        if not candidates:
            raise NoLiveWorker(why_unavailable(self.snapshot, model_id))
        return candidates

    @contextlib.asynccontextmanager
    async def _metered(self, model_id: ModelId, count: int = 1) -> AsyncIterator[None]:
        """Counts `count` requests' arrival, and their refusal (every replica busy: 429,
        none: 503) when that is how they end."""
        self.demand.arrived(model_id, count)
        try:
            yield
        except (Overloaded, NoLiveWorker):
            self.demand.refused(model_id, count)
            raise

    async def _served(self, model_id: ModelId, events: AsyncIterator[GenerateEvent]
                      ) -> AsyncGenerator[GenerateEvent, None]:
        """`events` of one request on one worker; once one came, the request counts as
        admitted when it ends, however it ends. Without the worker's own times (0), its
        time in a slot is from dispatch to the last event."""
        dispatched = last = time.monotonic()
        tokens, end, seen = 0, None, False
        try:
            async for event in events:
                seen, last = True, time.monotonic()
                if isinstance(event, TokenDelta):
                    tokens += event.tokens
                elif isinstance(event, Finished):
                    end = event
                yield event
        finally:
            if seen:
                queued = end.queued_s if end else 0.0
                service = end.service_s if end and end.service_s > 0 else max(
                    0.0, last - dispatched - queued)
                used = end.usage.completion_tokens if end else tokens
                self.demand.admitted(model_id, queued, service, used)

    async def generate(self, req: ApiRequest) -> AsyncGenerator[GenerateEvent, None]:
        """One choice of `req` (its first)."""
        model_id = self.resolve(req.model)
        keys = prefix_keys(model_id, req.text, req.chat, req.tools_json)
        async with self._metered(model_id):
            candidates = await self._candidates(model_id, prefixes=keys)
            events = self._attempt(candidates, generate_request(req, model_id, 0), keys)
            async with aclosing(events):
                async for event in events:
                    yield event

    async def generate_choices(self, req: ApiRequest, trace: Traced = _untraced
                               ) -> AsyncGenerator[tuple[int, GenerateEvent], None]:
        """All `req.n` choices as (choice index, event), interleaved as they come. The
        request is routed once: every choice goes to the same replica, concurrently, and
        each keeps the retry rules of a single request. `trace` wraps each choice's events."""
        if req.n == 1:
            async with aclosing(trace(self.generate(req))) as events:
                async for event in events:
                    yield 0, event
            return
        model_id = self.resolve(req.model)
        keys = prefix_keys(model_id, req.text, req.chat, req.tools_json)
        async with self._metered(model_id, req.n):
            candidates = await self._candidates(model_id, prefixes=keys)
            streams = [trace(self._attempt(candidates, generate_request(req, model_id, i),
                                           keys)) for i in range(req.n)]
            async with aclosing(merged(streams)) as choices:
                async for item in choices:
                    yield item

    async def _attempt(self, candidates: Sequence[WorkerInfo], request: GenerateRequest,
                       prefixes: tuple[int, ...] = ()) -> AsyncGenerator[GenerateEvent, None]:
        """`request` on the first candidate that takes it; the next when one fails before
        its first token. The one that takes it holds the prompt's `prefixes` from then."""
        failures: list[str] = []
        busy, silent = 0, []
        for worker in candidates:
            started = False
            try:
                async with aclosing(self._served(request.model_id,
                                                 self._call(worker, request))) as events:
                    async for event in events:
                        if not started:
                            started = True
                            self.prefixes.remember(prefixes, worker.worker_id)
                        yield event
                return
            except grpc.aio.AioRpcError as exc:
                failure = f"{worker.worker_id}: {exc.code().name} {exc.details()}"
                busy += self._failed(worker, grpc_errors.error_from_rpc(exc), failure, started)
            except WorkerSilent as exc:  # a frozen node: like a failed one, until it answers
                self._broke(worker)
                if started:
                    raise
                failure = str(exc)
                silent.append(exc)
            failures.append(failure)
            log.warning("worker %s failed for %s: %s", worker.worker_id, request.model_id,
                        failure)
        if busy == len(candidates):
            raise ReplicasBusy(request.model_id, failures)
        if len(silent) == len(candidates):
            raise silent[-1]
        raise ReplicasFailed(request.model_id, failures)

    def _failed(self, worker: WorkerInfo, error: MeshError | None, failure: str,
                started: bool) -> bool:
        """Whether the worker refused as busy. Raises when no other replica may try: the
        request itself is wrong (each would refuse it), or tokens were already sent."""
        if isinstance(error, InvalidGenerateRequest):
            raise error
        busy = isinstance(error, Overloaded)
        if not busy:  # busy is not broken: no failure mark against the worker
            self._broke(worker)
        if started:
            raise StreamBroken(f"worker {failure} after the stream began")
        return busy

    async def embed(self, model: str, inputs: tuple[EmbedInput, ...]) -> Embeddings:
        """The inputs' vectors from one replica held whole (a split one serves none);
        the next replica when one fails, as for generation."""
        model_id = self.resolve(model)
        if not serves_embeddings(self.snapshot, model_id):
            raise InvalidGenerateRequest(
                f"model {model_id} is split across workers: it serves no embeddings", "model")
        request = EmbedRequest(RequestId("emb-" + uuid.uuid4().hex[:24]), model_id, inputs)
        async with self._metered(model_id):
            return await self._embed_any(await self._candidates(model_id, whole_only=True),
                                         request)

    async def _embed_any(self, candidates: Sequence[WorkerInfo], request: EmbedRequest
                         ) -> Embeddings:
        model_id = request.model_id
        failures, busy = [], 0
        for worker in candidates:
            try:
                started = time.monotonic()
                embeddings = await self._embed_call(worker, request)
                self.demand.admitted(model_id, 0.0, time.monotonic() - started)
                return embeddings
            except grpc.aio.AioRpcError as exc:
                failure = f"{worker.worker_id}: {exc.code().name} {exc.details()}"
                busy += self._failed(worker, grpc_errors.error_from_rpc(exc), failure, False)
                failures.append(failure)
                log.warning("worker %s failed embeddings for %s: %s", worker.worker_id,
                            model_id, failure)
        if busy == len(candidates):
            raise ReplicasBusy(model_id, failures)
        raise ReplicasFailed(model_id, failures)

    async def _embed_call(self, worker: WorkerInfo, request: EmbedRequest) -> Embeddings:
        # As long as a first token may take, for every engine decode the inputs may need.
        timeout_s = self._first_timeout_s * (1 + len(request.inputs) // EMBED_SEQS_PER_DECODE)
        probe = self._dispatched(worker)
        try:
            reply = await self._stub(worker.address).Embed(
                convert.embed_request_to_pb(request), timeout=timeout_s)
            self._answered(worker)
        finally:
            self._returned(worker, probe)
        return convert.embeddings_from_pb(reply)

    async def _call(self, worker: WorkerInfo, request: GenerateRequest
                    ) -> AsyncIterator[GenerateEvent]:
        call = self._stub(worker.address).Generate(convert.generate_request_to_pb(request))
        probe, answered = self._dispatched(worker), False
        timeout = self._first_timeout_s
        try:
            while True:
                try:
                    message = await asyncio.wait_for(call.read(), timeout)
                except TimeoutError as exc:
                    raise WorkerSilent(worker.worker_id, timeout) from exc
                except asyncio.CancelledError:
                    # grpc.aio can end a read that wait_for gave up on with CancelledError
                    # instead of the TimeoutError (a call still waiting for a frozen peer's
                    # headers); only a cancel of this task itself is the caller leaving.
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise
                    raise WorkerSilent(worker.worker_id, timeout) from None
                if message is grpc.aio.EOF:
                    return
                if not answered:  # its first answer: it is alive (a probe succeeded)
                    answered = True
                    self._answered(worker)
                timeout = self._token_timeout_s
                yield convert.event_from_pb(message)
        finally:
            call.cancel()  # no-op when finished; frees the worker's slot when we stop early
            self._returned(worker, probe)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
