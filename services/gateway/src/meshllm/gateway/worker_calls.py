"""gRPC calls from the gateway to workers, and the per-worker records (load, bans) every
call updates. The progress watchdog lives here: a call that goes quiet asks its worker
whether it is alive, so a frozen node or a cut link is found in about a second, not when a
token timeout runs out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from meshllm.common import convert
from meshllm.common.grpcutil import KEEPALIVE_CLIENT
from meshllm.common.tls import GrpcSecurity
from meshllm.common.types import (
    Embeddings,
    EmbedRequest,
    GenerateEvent,
    GenerateRequest,
    WorkerId,
    WorkerInfo,
)
from meshllm.gateway.bans import on_dispatch, on_failure, on_return, on_success
from meshllm.gateway.config import StreamTiming
from meshllm.gateway.failures import WorkerSilent
from meshllm.gateway.metrics import RoutingMetrics
from meshllm.gateway.routing import WorkerLoad
from meshllm.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

EMBED_SEQS_PER_DECODE = 64  # inputs a worker embeds in one decode at most (sizes timeouts)


class WorkerCalls:
    def __init__(self, timing: StreamTiming, security: GrpcSecurity,
                 interceptors: Sequence[Any], metrics: RoutingMetrics) -> None:
        self.timing = timing
        self.loads: dict[WorkerId, WorkerLoad] = {}  # updated by bans.on_* only
        self._security = security
        self._interceptors = list(interceptors)  # they carry the trace context to workers
        self._metrics = metrics
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> worker_pb2_grpc.ShardWorkerStub:
        if address not in self._channels:
            self._channels[address] = self._security.channel(
                address, options=KEEPALIVE_CLIENT, interceptors=self._interceptors)
        return worker_pb2_grpc.ShardWorkerStub(self._channels[address])

    async def keep_only(self, live: set[str]) -> None:
        """Closes the channels to addresses no longer in the mesh (their calls end)."""
        for address in list(self._channels.keys() - live):
            await self._channels.pop(address).close()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()

    def _load(self, worker: WorkerInfo) -> WorkerLoad:
        return self.loads.get(worker.worker_id, WorkerLoad())

    def _dispatched(self, worker: WorkerInfo) -> bool:
        """A call starts on `worker`; whether it is the probe that may end its ban."""
        state, probe = on_dispatch(self._load(worker), time.monotonic())
        self.loads[worker.worker_id] = state
        if probe:
            log.info("probing worker %s after its ban", worker.worker_id)
            self._metrics.probed(worker.worker_id)
        return probe

    def _returned(self, worker: WorkerInfo, probe: bool) -> None:
        self.loads[worker.worker_id] = on_return(self._load(worker), probe)

    def _answered(self, worker: WorkerInfo) -> None:
        self.loads[worker.worker_id] = on_success(self._load(worker), time.monotonic())

    def broke(self, worker: WorkerInfo) -> None:
        state = on_failure(self._load(worker), time.monotonic())
        self.loads[worker.worker_id] = state
        self._metrics.banned(worker.worker_id)
        log.info("worker %s banned for %.0f s (failure %d in a row)", worker.worker_id,
                 state.banned_until_s - state.last_failure_at_s, state.strikes)

    async def embed(self, worker: WorkerInfo, request: EmbedRequest) -> Embeddings:
        # As long as a first token may take, for every engine decode the inputs may need.
        timeout_s = self.timing.first_token_timeout_s * (
            1 + len(request.inputs) // EMBED_SEQS_PER_DECODE)
        probe = self._dispatched(worker)
        try:
            reply = await self._stub(worker.address).Embed(
                convert.embed_request_to_pb(request), timeout=timeout_s)
            self._answered(worker)
        finally:
            self._returned(worker, probe)
        return convert.embeddings_from_pb(reply)

    async def generate(self, worker: WorkerInfo, request: GenerateRequest
                       ) -> AsyncIterator[GenerateEvent]:
        call = self._stub(worker.address).Generate(convert.generate_request_to_pb(request))
        probe, answered = self._dispatched(worker), False
        try:
            while True:
                message = await self._read(worker, call, answered)
                if message is grpc.aio.EOF:
                    return
                if not answered:  # its first answer: it is alive (a probe succeeded)
                    answered = True
                    self._answered(worker)
                yield convert.event_from_pb(message)
        finally:
            call.cancel()  # no-op when finished; frees the worker's slot when we stop early
            self._returned(worker, probe)

    async def _read(self, worker: WorkerInfo, call: Any, decoding: bool) -> Any:
        """The call's next message. The progress watchdog: after stall_probe_s without one,
        the worker is asked (GetStats, on its own deadline) whether it is alive; a worker
        that does not answer (frozen, or the link cut without a reset) is silent at once.
        One that answers may take until the timeout (a long prefill, a queue), unless it
        says for STUCK_PROBES probes in a row that it holds no request at all (the call
        was lost there: an engine stopped under it), or, once it is `decoding` this stream,
        claims running requests while its count of generated tokens stands still (an
        engine that hangs)."""
        timeout_s = (self.timing.token_timeout_s if decoding
                     else self.timing.first_token_timeout_s)
        read = asyncio.ensure_future(call.read())
        started, watch = time.monotonic(), _ProgressWatch()
        try:
            while True:
                left = started + timeout_s - time.monotonic()
                done, _ = await asyncio.wait({read}, timeout=max(0.0, min(
                    self.timing.stall_probe_s, left)))
                if read in done:
                    break
                if left <= self.timing.stall_probe_s:
                    raise WorkerSilent(worker.worker_id, timeout_s)
                stats = await self._probe(worker)
                wrong = "" if stats is None else watch.wrong(stats, decoding)
                if stats is None or wrong:
                    raise WorkerSilent(worker.worker_id, time.monotonic() - started, wrong)
        finally:
            if not read.done():
                read.cancel()
        if read.cancelled():  # the channel closed under it: the worker left the mesh
            raise WorkerSilent(worker.worker_id, time.monotonic() - started)
        return read.result()

    async def _probe(self, worker: WorkerInfo) -> worker_pb2.WorkerStats | None:
        """The worker's answer to the watchdog; None when it gave none in time."""
        try:
            stats: worker_pb2.WorkerStats = await self._stub(worker.address).GetStats(
                worker_pb2.GetStatsRequest(), timeout=self.timing.probe_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.info("worker %s did not answer the progress probe: %s", worker.worker_id,
                     exc.code().name)
            return None
        return stats


STUCK_PROBES = 3  # answered probes in a row that show the call is not being served


class _ProgressWatch:
    """Whether a worker that answers probes still serves the call (mutable: one per wait)."""

    def __init__(self) -> None:
        self._last = -1
        self._still = 0
        self._empty = 0

    def wrong(self, stats: worker_pb2.WorkerStats, decoding: bool) -> str:
        """What is wrong with a worker that answers, once STUCK_PROBES probes agree; ""
        while the call may wait on."""
        held = stats.running_requests + stats.queued_requests
        self._empty = self._empty + 1 if held == 0 else 0
        same = decoding and stats.generated_tokens_total == self._last and held > 0
        self._still = self._still + 1 if same else 0
        self._last = stats.generated_tokens_total
        if self._empty >= STUCK_PROBES:
            return "it answers, but holds no request"
        if self._still >= STUCK_PROBES:
            return "it answers, but makes no tokens"
        return ""
