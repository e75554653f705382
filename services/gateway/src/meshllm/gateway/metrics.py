"""Prometheus metrics of the gateway, in a registry of its own (no global state)."""

from __future__ import annotations

import time

from meshllm.common.types import Usage
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("meshllm_gateway_requests", "Requests by model and outcome",
                                ["model", "outcome"], registry=self.registry)
        self.ttft = Histogram("meshllm_gateway_time_to_first_token_seconds",
                              "Time from request to first token", ["model"],
                              buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.duration = Histogram("meshllm_gateway_request_duration_seconds",
                                  "Time from request to last token", ["model"],
                                  buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.prompt_tokens = Counter("meshllm_gateway_prompt_tokens", "Prompt tokens",
                                     ["model"], registry=self.registry)
        self.inter_token = Histogram("meshllm_gateway_inter_token_latency_seconds",
                                     "Time between streamed tokens", ["model"],
                                     buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.completion_tokens = Counter("meshllm_gateway_completion_tokens",
                                         "Generated tokens", ["model"], registry=self.registry)

    def request_timer(self, model: str) -> RequestTimer:
        return RequestTimer(self, model)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """Measures one request; `done` records it exactly once."""

    def __init__(self, metrics: GatewayMetrics, model: str) -> None:
        self._m = metrics
        self._model = model
        self._start = time.perf_counter()
        self._last_token: float | None = None
        self._finished = False

    def first_token(self) -> None:
        self._last_token = time.perf_counter()
        self._m.ttft.labels(self._model).observe(self._last_token - self._start)

    def tokens(self, n: int) -> None:
        now = time.perf_counter()
        if n and self._last_token is not None and now > self._last_token:
            self._m.inter_token.labels(self._model).observe((now - self._last_token) / n)
            self._last_token = now
        self._m.completion_tokens.labels(self._model).inc(n)

    def done(self, outcome: str, usage: Usage | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        self._m.requests.labels(self._model, outcome).inc()
        self._m.duration.labels(self._model).observe(time.perf_counter() - self._start)
        if usage is not None:
            self._m.prompt_tokens.labels(self._model).inc(usage.prompt_tokens)
