"""Round trips to the other workers, measured with a small gRPC ping and published in
this worker's record so that the planner can prefer fast links for splits."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import grpc
from meshllm.common.tls import PLAINTEXT, GrpcSecurity
from meshllm.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

PINGS_PER_ROUND = 3
PING_TIMEOUT_S = 2.0


def should_publish(published: Mapping[str, float], measured: Mapping[str, float]) -> bool:
    """Publish when peers came or went, or a link changed by more than a quarter (and more
    than 0.5 ms): every publication wakes every watcher of the mesh."""
    if published.keys() != measured.keys():
        return True
    return any(abs(measured[p] - published[p]) > max(0.5, 0.25 * published[p])
               for p in measured)


def step_round_trip_s(measured_ms: Mapping[str, float], stages: Sequence[str]) -> float:
    """What one decode step of a split waits on its links: the head talks to each stage in
    turn (llama.cpp's scheduler is a star), so the round trips to its stages add up. A stage
    not measured yet counts as the slowest one that is (0 when none is). The engine's draft
    tuner takes this (BatchConfig.link_rtt_s, engine/batch/draft_tuning.py)."""
    known = [measured_ms[s] for s in stages if s in measured_ms]
    fallback = max(known, default=0.0)
    return sum(measured_ms.get(s, fallback) for s in stages) / 1000


class LinkMonitor:
    def __init__(self, worker_id: str, interval_s: float,
                 security: GrpcSecurity = PLAINTEXT) -> None:
        self.worker_id = worker_id
        self.published: dict[str, float] = {}
        self.peers: dict[str, str] = {}  # worker id -> gRPC address, from the mesh snapshot
        self._interval_s = interval_s
        self._security = security
        self._channels: dict[str, grpc.aio.Channel] = {}  # kept between rounds: no reconnects

    async def _round_trip_ms(self, address: str) -> float | None:
        if address not in self._channels:
            self._channels[address] = self._security.channel(address)
        stub = worker_pb2_grpc.ShardWorkerStub(self._channels[address])
        best = None
        for _ in range(PINGS_PER_ROUND):
            started = time.perf_counter()
            try:
                await stub.Ping(worker_pb2.PingRequest(from_worker_id=self.worker_id),
                                timeout=PING_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                return None
            elapsed = (time.perf_counter() - started) * 1000
            best = elapsed if best is None else min(best, elapsed)
        return best

    async def _drop_gone(self) -> None:
        live = set(self.peers.values())
        for address in list(self._channels.keys() - live):
            await self._channels.pop(address).close()

    async def measure(self) -> dict[str, float]:
        await self._drop_gone()
        measured = {}
        for peer, address in sorted(self.peers.items()):
            rtt = await self._round_trip_ms(address)
            if rtt is not None:
                measured[peer] = round(rtt, 2)
        return measured

    async def run(self, publish: Callable[[], Awaitable[None]]) -> None:
        while True:
            measured = await self.measure()
            if should_publish(self.published, measured):
                self.published = measured
                await publish()
            await asyncio.sleep(self._interval_s)
