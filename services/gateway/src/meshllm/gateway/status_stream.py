"""The live state behind the console: the mesh snapshot, per-worker load, tokens/s per
model and the most recent requests, pushed as server-sent events.

Recent requests come from the gateway's request records (`recent.RecentRequests`, fed by
its request timers) and tokens/s from its Prometheus counters: both already account for
every request, sampled by tracing or not, so the request path needs no extra hook for the
console.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, Protocol

from meshllm.common.demand import ModelDemand
from meshllm.common.meshview import MeshSnapshot
from meshllm.common.status import mesh_status
from meshllm.common.types import ModelId, WorkerId
from meshllm.gateway.bans import Health, WorkerLoad, health
from meshllm.gateway.recent import RecentRequests, RequestRecord
from prometheus_client import CollectorRegistry
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

TOKENS_METRIC = "meshllm_gateway_completion_tokens"  # GatewayMetrics' generated tokens
RATE_WINDOW_S = 10.0
PUSH_INTERVAL_S = 1.0
HEARTBEAT_S = 15.0


class MeshSource(Protocol):
    """What the stream reads from the gateway's backend."""

    @property
    def snapshot(self) -> MeshSnapshot: ...

    @property
    def loads(self) -> Mapping[WorkerId, WorkerLoad]: ...


def token_totals(registry: CollectorRegistry, metric: str = TOKENS_METRIC) -> dict[str, float]:
    """Generated tokens so far by model, read from the gateway's counters."""
    totals: dict[str, float] = {}
    for family in registry.collect():
        if family.name != metric:
            continue
        for sample in family.samples:
            if sample.name == metric + "_total":
                model = sample.labels.get("model", "")
                totals[model] = totals.get(model, 0.0) + sample.value
    return totals


def rates(oldest: tuple[float, Mapping[str, float]], newest: tuple[float, Mapping[str, float]]
          ) -> dict[str, float]:
    """Tokens per second by model between two (time, totals) samples."""
    elapsed = newest[0] - oldest[0]
    if elapsed <= 0:
        return {model: 0.0 for model in newest[1]}
    return {model: max(total - oldest[1].get(model, 0.0), 0.0) / elapsed
            for model, total in newest[1].items()}


class TokenRate:
    """Tokens/s per model over a sliding window of counter samples."""

    def __init__(self, registry: CollectorRegistry, window_s: float = RATE_WINDOW_S) -> None:
        self._registry = registry
        self._window_s = window_s
        self._samples: collections.deque[tuple[float, dict[str, float]]] = collections.deque()

    def sample(self, now_s: float) -> dict[str, float]:
        self._samples.append((now_s, token_totals(self._registry)))
        while len(self._samples) > 2 and now_s - self._samples[1][0] >= self._window_s:
            self._samples.popleft()
        return rates(self._samples[0], self._samples[-1])


def console_state(snapshot: MeshSnapshot, loads: Mapping[WorkerId, WorkerLoad],
                  tokens_per_s: Mapping[str, float], recent: Sequence[RequestRecord],
                  now_s: float, monotonic_s: float,
                  demand: Mapping[ModelId, ModelDemand] | None = None) -> dict[str, Any]:
    """Everything the console shows, as plain data (pure)."""
    status = mesh_status(snapshot, demand).to_json()
    for node in status["nodes"]:
        load = loads.get(node["worker_id"], WorkerLoad())
        node["in_flight"] = load.in_flight
        node["failed_recently"] = health(load, monotonic_s) is not Health.HEALTHY
    for model in status["models"]:
        model["tokens_per_s"] = round(tokens_per_s.get(model["model_id"], 0.0), 2)
    return {"at_unix_s": now_s, "nodes": status["nodes"], "models": status["models"],
            "suspects": status["suspects"], "tokens_per_s": round(sum(tokens_per_s.values()), 2),
            "recent": [asdict(r) for r in recent]}


def sse(event: str, data: object) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class StatusStream:
    def __init__(self, source: MeshSource, registry: CollectorRegistry,
                 recent: RecentRequests,
                 demand: Callable[[], Mapping[ModelId, ModelDemand]] | None = None,
                 interval_s: float = PUSH_INTERVAL_S) -> None:
        self._source = source
        self._demand = demand
        self._recent = recent
        self._rate = TokenRate(registry)
        self._interval_s = interval_s

    def state(self) -> dict[str, Any]:
        rates_now = self._rate.sample(time.monotonic())
        return console_state(self._source.snapshot, self._source.loads, rates_now,
                             self._recent.latest(), time.time(), time.monotonic(),
                             self._demand() if self._demand else None)

    async def events(self) -> AsyncIterator[str]:
        """A `status` event whenever something the console shows changed (checked every
        interval), and a comment now and then so that proxies keep the stream open."""
        last, quiet_s = "", 0.0
        while True:
            state = self.state()
            body = json.dumps({k: v for k, v in state.items() if k != "at_unix_s"})
            if body != last:
                last, quiet_s = body, 0.0
                yield sse("status", state)
            elif quiet_s >= HEARTBEAT_S:
                quiet_s = 0.0
                yield ": heartbeat\n\n"
            await asyncio.sleep(self._interval_s)
            quiet_s += self._interval_s

    async def endpoint(self, request: Request) -> Response:
        return StreamingResponse(self.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})
