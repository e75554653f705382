"""The mesh as the gateway sees it: placements from etcd, gRPC calls to workers, a
failed worker's request moved to another replica. Failures are raised as typed mesh
errors (gateway.failures, or the worker's own error rebuilt from its reason code); only
the HTTP edge turns them into status codes."""

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
from meshllm.common import grpc_errors, telemetry
from meshllm.common.errors import (
    InvalidGenerateRequest,
    MeshError,
    Overloaded,
)
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
    Replica,
    RequestId,
    TokenDelta,
    WorkerId,
    WorkerInfo,
)
from meshllm.gateway.affinity import PrefixTable
from meshllm.gateway.choices import Traced, generate_request, merged
from meshllm.gateway.cold_start import wait_for_replicas
from meshllm.gateway.config import StreamTiming
from meshllm.gateway.demand import DemandMeter
from meshllm.gateway.failures import (
    NoLiveWorker,
    ReplicasBusy,
    ReplicasFailed,
    StreamBroken,
    UnknownModel,
    WorkerSilent,
    refusal,
)
from meshllm.gateway.metrics import RoutingMetrics
from meshllm.gateway.migration import (
    REST_S,
    StreamRun,
    may_take,
    replica_headed_by,
)
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
from meshllm.gateway.sessions import route_keys
from meshllm.gateway.suspects import SuspectReporter, to_report
from meshllm.gateway.worker_calls import WorkerCalls

log = logging.getLogger(__name__)

def _untraced(events: AsyncGenerator[GenerateEvent, None]
              ) -> AsyncGenerator[GenerateEvent, None]:
    return events


class MeshBackend:
    def __init__(self, kv: KeyValueStore, timing: StreamTiming,
                 tracer: telemetry.Tracer = telemetry.NO_TRACER,
                 interceptors: Sequence[Any] = (), security: GrpcSecurity = PLAINTEXT,
                 demand: DemandMeter | None = None,
                 routing_metrics: RoutingMetrics | None = None,
                 suspects: SuspectReporter | None = None) -> None:
        self.snapshot = MeshSnapshot()
        self.demand = demand if demand is not None else DemandMeter()
        self._mesh_changed = asyncio.Event()  # set, then replaced, at every new snapshot
        self.synced = asyncio.Event()
        self.prefixes = PrefixTable()  # which replica last served each prompt prefix
        self.routing_metrics = routing_metrics if routing_metrics is not None else (
            RoutingMetrics())
        self.calls = WorkerCalls(timing, security, interceptors, self.routing_metrics)
        self._kv = kv
        self._tracer = tracer
        self._suspects = suspects  # None: the planner learns of dead stages from leases

    @property
    def timing(self) -> StreamTiming:
        return self.calls.timing

    @timing.setter
    def timing(self, timing: StreamTiming) -> None:
        self.calls.timing = timing

    @property
    def loads(self) -> dict[WorkerId, WorkerLoad]:
        return self.calls.loads

    async def follow(self) -> None:
        async for snapshot in follow_mesh(self._kv):
            self.snapshot = snapshot
            self.synced.set()
            self._mesh_changed.set()
            self._mesh_changed = asyncio.Event()
            await self.calls.keep_only({w.address for w in snapshot.workers.values()})

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
                self.timing.cold_start_wait_s)
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
        keys = route_keys(model_id, req.text, req.chat, req.tools_json, req.session)
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
        keys = route_keys(model_id, req.text, req.chat, req.tools_json, req.session)
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
        its first token. Once the stream has begun, a failed worker's stream moves to
        another replica, which carries it on from the tokens already sent (migration.py),
        up to max_migrations times. The one that takes it holds the prompt's `prefixes`."""
        run, queue = StreamRun(request), list(candidates)
        failures: list[str] = []
        busy, silent = 0, []
        while (worker := await self._next_worker(run, queue)) is not None:
            fresh = True
            # as it is now: by the time it fails it may be re-planned around a dead stage
            sent_to = replica_headed_by(self.snapshot, request.model_id, worker.worker_id)
            try:
                async with aclosing(self._served(request.model_id, self.calls.generate(
                        worker, run.next_request()))) as events:
                    async for event in events:
                        if fresh:
                            fresh = False
                            self._took(run, worker, prefixes)
                        run.saw(event)
                        yield event
                return
            except grpc.aio.AioRpcError as exc:
                failure, cause = f"{worker.worker_id}: {exc.code().name} {exc.details()}", (
                    exc.code().name.lower())
                transient = self._refused(worker, grpc_errors.error_from_rpc(exc))
                busy, answering = busy + (transient == "busy"), False
            except WorkerSilent as exc:  # a frozen node: like a failed one, until it answers
                self.calls.broke(worker)
                failure, cause, transient, answering = str(exc), "silent", "", exc.answering
                silent.append(exc)
            failures.append(failure)
            log.warning("worker %s failed for %s: %s", worker.worker_id, request.model_id,
                        failure)
            # refused after this attempt's first event: not to blame, but the stream moves
            self._lost(run, worker, sent_to, (cause, failure), bool(transient), answering,
                       moved=not fresh)
        raise self._gave_up(run, failures, busy, silent)

    @staticmethod
    def _gave_up(run: StreamRun, failures: list[str], busy: int,
                 silent: list[WorkerSilent]) -> MeshError:
        if run.started:
            return StreamBroken(f"no replica could carry the stream on ({'; '.join(failures)})")
        if busy == len(failures):
            return ReplicasBusy(run.request.model_id, failures)
        if len(silent) == len(failures):
            return silent[-1]
        return ReplicasFailed(run.request.model_id, failures)

    def _took(self, run: StreamRun, worker: WorkerInfo, prefixes: tuple[int, ...]) -> None:
        """`worker` answered `run`: it holds the prompt's prefixes now; when it carried the
        stream on after a failure, the move is counted."""
        self.prefixes.remember(prefixes, worker.worker_id)
        resumed_s = run.resumed()
        if resumed_s is None:
            return
        log.info("request %s carried on by %s %.2f s after its worker failed (%s), "
                 "%d tokens replayed", run.request.request_id, worker.worker_id, resumed_s,
                 run.cause, len(run.sent_ids))
        self.routing_metrics.migrated(run.request.model_id, run.cause, resumed_s,
                                      len(run.sent_ids))
        telemetry.record_migration(self._tracer, run.request.model_id, worker.worker_id,
                                   run.cause, resumed_s, len(run.sent_ids))

    def _lost(self, run: StreamRun, worker: WorkerInfo, replica: Replica | None,
              why: tuple[str, str], transient: bool, answering: bool = False,
              moved: bool = False) -> None:
        """Marks `worker` (heading `replica` when the stream went to it) failed for `run`, or
        resting when it refused for now (busy, loading); raises when it may not move again."""
        cause, failure = why
        if transient:
            run.refused_by(worker.worker_id, cause, moved)
        else:
            run.failed_on(worker.worker_id, replica, cause, answering)
            if replica is not None and self._suspects is not None:
                self._suspects.report(to_report(replica, self.snapshot.workers),
                                      f"{run.request.model_id}: {failure}")
        if run.started and run.migrations > self.timing.max_migrations:
            raise StreamBroken(f"worker {failure} after the stream began "
                               f"(moved {run.migrations - 1} times already)")

    async def _next_worker(self, run: StreamRun, queue: list[WorkerInfo]) -> WorkerInfo | None:
        """The next replica to try: the routed order first; then, for a stream that has
        begun, any ready replica that has not failed it, waiting up to migrate_wait_s for
        one to come up (a split re-planned around a dead stage takes a while)."""
        while queue:
            worker = queue.pop(0)
            if may_take(run, self.snapshot, worker.worker_id):
                return worker
        if not run.started:
            return None
        # From the failure being recovered from: refusals (not counted as moves) cannot
        # keep a stream waiting longer than this between them.
        deadline = (run.failed_at_s or time.monotonic()) + self.timing.migrate_wait_s
        while True:
            model_id = run.request.model_id
            live = ready_replicas(self.snapshot, model_id)
            ready = ([w for w in live if may_take(run, self.snapshot, w.worker_id)]
                     or [w for w in live if run.may_retry(w.worker_id)])
            if ready:
                chosen = self._decide(RequestKey(model_id), ready).order[0]
                run.answering.discard(chosen.worker_id)
                return chosen
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            await self._next_change(min(left, REST_S))  # a resting replica may try again

    def _refused(self, worker: WorkerInfo, error: MeshError | None) -> str:
        """The error's `refusal` ("busy", "not now", or "" for a failure, which bans the
        worker). Raises when no other replica may try: the request itself is wrong (each
        would refuse it; a resume too: a replica of the same model refusing the tokens
        another produced is a bug to see, not to route around)."""
        if isinstance(error, InvalidGenerateRequest):
            raise error
        kind = refusal(error)
        if not kind:
            self.calls.broke(worker)
        return kind

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
                embeddings = await self.calls.embed(worker, request)
                self.demand.admitted(model_id, 0.0, time.monotonic() - started)
                return embeddings
            except grpc.aio.AioRpcError as exc:
                failure = f"{worker.worker_id}: {exc.code().name} {exc.details()}"
                busy += self._refused(worker, grpc_errors.error_from_rpc(exc)) == "busy"
                failures.append(failure)
                log.warning("worker %s failed embeddings for %s: %s", worker.worker_id,
                            model_id, failure)
        if busy == len(candidates):
            raise ReplicasBusy(model_id, failures)
        raise ReplicasFailed(model_id, failures)

    async def close(self) -> None:
        if self._suspects is not None:
            await self._suspects.close()
        await self.calls.close()

