"""The live state behind the console: the mesh snapshot, per-worker load, tokens/s per
model and the most recent requests, pushed as server-sent events.

Recent requests come from the gateway's own GenAI spans (a span processor), and tokens/s
from its Prometheus counters: both already record every request, so the request path
needs no extra hook for the console.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from meshllm.common.meshview import MeshSnapshot
from meshllm.common.status import mesh_status
from meshllm.common.types import WorkerId
from meshllm.gateway.routing import FAILURE_MEMORY_S, WorkerLoad
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

TOKENS_METRIC = "meshllm_gateway_completion_tokens"  # GatewayMetrics' generated tokens
RATE_WINDOW_S = 10.0
RECENT_REQUESTS = 50
PUSH_INTERVAL_S = 1.0
HEARTBEAT_S = 15.0


class MeshSource(Protocol):
    """What the stream reads from the gateway's backend."""

    @property
    def snapshot(self) -> MeshSnapshot: ...

    @property
    def loads(self) -> Mapping[WorkerId, WorkerLoad]: ...


@dataclass(frozen=True)
class RequestRecord:
    at_unix_s: float
    model: str
    operation: str
    outcome: str
    finish_reason: str
    input_tokens: int
    output_tokens: int
    duration_s: float
    ttft_s: float | None
    trace_id: str


def record_from_span(span: ReadableSpan) -> RequestRecord | None:
    """A request record from the gateway's GenAI client span; None for any other span."""
    attrs = span.attributes or {}
    if span.kind is not SpanKind.CLIENT or "gen_ai.operation.name" not in attrs:
        return None
    reasons = attrs.get("gen_ai.response.finish_reasons") or ("",)
    ttft = attrs.get("meshllm.time_to_first_token_s")
    start, end = span.start_time or 0, span.end_time or 0
    return RequestRecord(
        at_unix_s=end / 1e9, model=str(attrs.get("gen_ai.request.model", "")),
        operation=str(attrs["gen_ai.operation.name"]),
        outcome=str(attrs.get("meshllm.outcome", "")),
        finish_reason=str(reasons[0]) if isinstance(reasons, Sequence) else "",
        input_tokens=int(str(attrs.get("gen_ai.usage.input_tokens", 0))),
        output_tokens=int(str(attrs.get("gen_ai.usage.output_tokens", 0))),
        duration_s=(end - start) / 1e9,
        ttft_s=float(str(ttft)) if ttft is not None else None,
        trace_id=format(span.context.trace_id, "032x") if span.context else "")


class RecentRequests(SpanProcessor):
    """Keeps the last requests' records; add it to the gateway's tracer provider."""

    def __init__(self, size: int = RECENT_REQUESTS) -> None:
        self._records: collections.deque[RequestRecord] = collections.deque(maxlen=size)
        self._lock = threading.Lock()  # spans may end on another thread than the reader's

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        record = record_from_span(span)
        if record is not None:
            with self._lock:
                self._records.append(record)

    def latest(self) -> list[RequestRecord]:
        with self._lock:
            return list(reversed(self._records))

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


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
                  now_s: float, monotonic_s: float) -> dict[str, Any]:
    """Everything the console shows, as plain data (pure)."""
    status = mesh_status(snapshot)
    for node in status["nodes"]:
        load = loads.get(node["worker_id"], WorkerLoad())
        node["in_flight"] = load.in_flight
        node["failed_recently"] = monotonic_s - load.last_failure_at_s < FAILURE_MEMORY_S
    for model in status["models"]:
        model["tokens_per_s"] = round(tokens_per_s.get(model["model_id"], 0.0), 2)
    return {"at_unix_s": now_s, "nodes": status["nodes"], "models": status["models"],
            "tokens_per_s": round(sum(tokens_per_s.values()), 2),
            "recent": [asdict(r) for r in recent]}


def sse(event: str, data: object) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class StatusStream:
    def __init__(self, source: MeshSource, registry: CollectorRegistry,
                 recent: RecentRequests, interval_s: float = PUSH_INTERVAL_S) -> None:
        self._source = source
        self._recent = recent
        self._rate = TokenRate(registry)
        self._interval_s = interval_s

    def state(self) -> dict[str, Any]:
        rates_now = self._rate.sample(time.monotonic())
        return console_state(self._source.snapshot, self._source.loads, rates_now,
                             self._recent.latest(), time.time(), time.monotonic())

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
