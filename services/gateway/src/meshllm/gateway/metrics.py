"""The gateway's request accounting: Prometheus metrics in a registry of its own (no
global state), and a record of each request for the console."""

from __future__ import annotations

import time

from meshllm.common import telemetry
from meshllm.common.types import Finished
from meshllm.gateway.key_limits import charge_tokens
from meshllm.gateway.recent import RecentRequests, RequestRecord
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self, recent: RecentRequests | None = None) -> None:
        self.recent = recent if recent is not None else RecentRequests()
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

        self.routing = RoutingMetrics(self.registry)

    def request_timer(self, model: str, kind: str, request_id: str) -> RequestTimer:
        """The timer of one OpenAI request (`kind`: "chat" or "completion")."""
        return RequestTimer(self, model, telemetry.api_operation(kind), request_id)

    def embedded(self, model: str, outcome: str, duration_s: float, prompt_tokens: int,
                 request_id: str) -> None:
        """One /v1/embeddings request: counted with the others, its tokens charged to the
        caller's key, and a record for the console."""
        self.requests.labels(model, outcome).inc()
        self.duration.labels(model).observe(duration_s)
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        charge_tokens(prompt_tokens)
        self.recent.add(RequestRecord(
            at_unix_s=time.time(), request_id=request_id, model=model, operation="embeddings",
            outcome=outcome, finish_reason="", input_tokens=prompt_tokens, output_tokens=0,
            duration_s=duration_s, ttft_s=None, trace_id=telemetry.current_trace_id()))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RoutingMetrics:
    """What routing learned: bans, probes, and prefix-affinity outcomes (`routing.Affinity`
    values: hit, miss, busy; prompts with no prefix key are not counted)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.bans = Counter("meshllm_gateway_worker_bans", "Workers banned after a failed call",
                            ["worker"], registry=registry)
        self.probes = Counter("meshllm_gateway_worker_probes",
                              "Requests sent to a worker as the probe that ends its ban",
                              ["worker"], registry=registry)
        self.affinity = Counter("meshllm_gateway_prefix_affinity",
                                "Requests by prefix-affinity outcome", ["model", "result"],
                                registry=registry)
        self.migrations = Counter(
            "meshllm_gateway_migrations", "Streams carried on by another replica after "
            "their worker failed, by cause (a gRPC status, or silent)", ["model", "cause"],
            registry=registry)
        self.resume_time = Histogram(
            "meshllm_gateway_migration_resume_seconds", "Time from a worker's failure to "
            "the first event of the replica that carried its stream on", ["model"],
            buckets=LATENCY_BUCKETS_S, registry=registry)
        self.replayed = Counter(
            "meshllm_gateway_migration_replayed_tokens", "Generated tokens a replica "
            "prefilled again to carry a stream on", ["model"], registry=registry)

    def migrated(self, model: str, cause: str, resume_s: float, replayed: int) -> None:
        self.migrations.labels(model, cause).inc()
        self.resume_time.labels(model).observe(resume_s)
        self.replayed.labels(model).inc(replayed)

    def banned(self, worker: str) -> None:
        self.bans.labels(worker).inc()

    def probed(self, worker: str) -> None:
        self.probes.labels(worker).inc()

    def routed(self, model: str, affinity: str) -> None:
        if affinity != "none":
            self.affinity.labels(model, affinity).inc()


class RequestTimer:
    """Measures one request; `done` records it exactly once."""

    def __init__(self, metrics: GatewayMetrics, model: str, operation: str,
                 request_id: str) -> None:
        self._m = metrics
        self._model = model
        self._operation = operation
        self._request_id = request_id
        self._start = time.perf_counter()
        self._ttft_s: float | None = None
        self._last_token: float | None = None
        self._tokens = 0
        self._end: Finished | None = None
        self._done = False

    def first_token(self) -> None:
        self._last_token = time.perf_counter()
        self._ttft_s = self._last_token - self._start
        self._m.ttft.labels(self._model).observe(self._ttft_s)

    def tokens(self, n: int) -> None:
        now = time.perf_counter()
        if n and self._last_token is not None and now > self._last_token:
            self._m.inter_token.labels(self._model).observe((now - self._last_token) / n)
            self._last_token = now
        self._tokens += n
        self._m.completion_tokens.labels(self._model).inc(n)

    def finished(self, event: Finished) -> None:
        """The worker's last word on the request: finish reason and usage."""
        self._end = event

    def done(self, outcome: str) -> None:
        """Called where the request ends, so the current span (if sampled) is its trace."""
        if self._done:
            return
        self._done = True
        duration_s = time.perf_counter() - self._start
        self._m.requests.labels(self._model, outcome).inc()
        self._m.duration.labels(self._model).observe(duration_s)
        if self._end is not None:
            self._m.prompt_tokens.labels(self._model).inc(self._end.usage.prompt_tokens)
        usage = self._end.usage if self._end else None  # a key's tokens-per-minute
        charge_tokens(usage.total_tokens if usage else self._tokens)
        self._m.recent.add(self._record(outcome, duration_s))

    def _record(self, outcome: str, duration_s: float) -> RequestRecord:
        end = self._end
        return RequestRecord(
            at_unix_s=time.time(), request_id=self._request_id, model=self._model,
            operation=self._operation, outcome=outcome,
            finish_reason=end.finish_reason if end else "",
            input_tokens=end.usage.prompt_tokens if end else 0,
            output_tokens=end.usage.completion_tokens if end else self._tokens,
            duration_s=duration_s, ttft_s=self._ttft_s, trace_id=telemetry.current_trace_id())
