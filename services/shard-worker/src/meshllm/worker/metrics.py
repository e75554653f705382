"""Prometheus metrics of a worker, in a registry of its own (served on its metrics port)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence

from meshllm.common.types import Finished, GenerateEvent, LoadState, ModelState
from meshllm.worker.engine_wire import EngineStats
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LOAD_BUCKETS_S = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def load_times(loading_since: Mapping[str, float], states: Sequence[ModelState], now_s: float
               ) -> tuple[dict[str, float], dict[str, float]]:
    """Which models are loading since when, and which just finished loading (seconds)."""
    still: dict[str, float] = {}
    done: dict[str, float] = {}
    for s in states:
        since = loading_since.get(s.model_id, now_s)
        if s.state is LoadState.LOADING:
            still[s.model_id] = since
        elif s.state is LoadState.READY and s.model_id in loading_since:
            done[s.model_id] = now_s - since
    return still, done


def _drain_metrics(r: CollectorRegistry) -> tuple[Gauge, Counter]:
    return (Gauge("meshllm_worker_model_draining",
                  "1 while the model drains before it unloads (retired)", ["model"],
                  registry=r),
            Counter("meshllm_worker_drain_cut_streams", "Streams cut because a drain timed out",
                    ["model"], registry=r))


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter("meshllm_worker_requests", "Generate calls by model and outcome",
                                ["model", "outcome"], registry=r)
        self.ttft = Histogram("meshllm_worker_time_to_first_token_seconds",
                              "From the call to its first token (queueing included)", ["model"],
                              buckets=LATENCY_BUCKETS_S, registry=r)
        self.inter_token = Histogram("meshllm_worker_inter_token_latency_seconds",
                                     "Time between tokens", ["model"],
                                     buckets=LATENCY_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("meshllm_worker_prompt_tokens", "Prompt tokens",
                                     ["model"], registry=r)
        self.generated_tokens = Counter("meshllm_worker_generated_tokens", "Generated tokens",
                                        ["model"], registry=r)
        self.running = Gauge("meshllm_worker_running_requests", "Requests being generated",
                             ["model"], registry=r)
        self.waiting = Gauge("meshllm_worker_waiting_requests", "Requests waiting their turn",
                             ["model"], registry=r)
        self.kv_cache_tokens = Gauge("meshllm_worker_kv_cache_tokens",
                                     "Tokens held in the KV cache", ["model"], registry=r)
        self.kv_cache_usage = Gauge("meshllm_worker_kv_cache_usage_ratio",
                                    "KV cache use, 0 to 1", ["model"], registry=r)
        self.load_seconds = Histogram("meshllm_worker_model_load_seconds",
                                      "Time from placement to ready", ["model"],
                                      buckets=LOAD_BUCKETS_S, registry=r)
        self.model_state = Gauge("meshllm_worker_model_state", "1 for the model's state",
                                 ["model", "state"], registry=r)
        self.draining, self.drain_cut_streams = _drain_metrics(r)
        self.acceptance = Gauge("meshllm_worker_speculative_acceptance_ratio",
                                "Drafted tokens the target accepted", ["model"],
                                registry=self.registry)
        self.tokens_per_step = Gauge("meshllm_worker_tokens_per_step",
                                     "Tokens per sequence per target decode (1 without "
                                     "speculation)", ["model"], registry=self.registry)
        self.cached_prompt_tokens = Gauge("meshllm_worker_cached_prompt_tokens",
                                          "Prompt tokens served from a reused prefix, in all",
                                          ["model"], registry=self.registry)
        self.lease_ok = Gauge("meshllm_worker_etcd_lease_ok",
                              "1 while the worker's etcd lease is held", registry=r)
        self._loading_since: dict[str, float] = {}

    def watch_lease(self, lease_ok: Callable[[], bool]) -> None:
        self.lease_ok.set_function(lambda: float(lease_ok()))

    def set_engine(self, model: str, stats: EngineStats) -> None:
        """The batched engine's own report: speculative decoding and prefix reuse."""
        if stats.drafted_tokens:
            self.acceptance.labels(model).set(stats.acceptance_rate)
        self.tokens_per_step.labels(model).set(stats.tokens_per_step)
        self.cached_prompt_tokens.labels(model).set(float(stats.prompt_tokens_cached))

    def set_load(self, model: str, in_flight: int, slots: int = 1) -> None:
        """`slots` requests run at once per engine; the rest wait for a free slot."""
        self.running.labels(model).set(min(in_flight, slots))
        self.waiting.labels(model).set(max(in_flight - slots, 0))

    def observe_states(self, states: Sequence[ModelState]) -> None:
        self._loading_since, done = load_times(self._loading_since, states, time.monotonic())
        for model, seconds in done.items():
            self.load_seconds.labels(model).observe(seconds)
        for s in states:
            self.running.labels(s.model_id)  # every hosted model has its series, even at 0
            self.waiting.labels(s.model_id)
            for state in LoadState:
                self.model_state.labels(s.model_id, state.value).set(float(s.state is state))
            self.draining.labels(s.model_id).set(float(s.draining))

    async def observe(self, model: str, context_tokens: int,
                      events: AsyncIterator[GenerateEvent]
                      ) -> AsyncGenerator[GenerateEvent, None]:
        """`events` unchanged, measured: latency per token, token counts, KV cache fill."""
        start = last = time.perf_counter()
        produced, outcome = 0, "error"
        self.kv_cache_tokens.labels(model).set(0)  # each request starts from a clean cache
        try:
            async for event in events:
                now = time.perf_counter()
                if isinstance(event, Finished):
                    self._finished(model, context_tokens, event)
                    outcome = "ok"
                elif event.tokens:
                    hist = self.ttft if produced == 0 else self.inter_token
                    hist.labels(model).observe(now - (start if produced == 0 else last))
                    produced, last = produced + event.tokens, now
                    self.kv_cache_tokens.labels(model).inc(event.tokens)
                yield event
        except GeneratorExit:
            outcome = "cancelled"
            raise
        finally:
            self.requests.labels(model, outcome).inc()
            if isinstance(events, AsyncGenerator):
                await events.aclose()

    def _finished(self, model: str, context_tokens: int, event: Finished) -> None:
        # The engine keeps the last request's tokens cached until the next one starts.
        used = event.usage.prompt_tokens + event.usage.completion_tokens
        self.prompt_tokens.labels(model).inc(event.usage.prompt_tokens)
        self.generated_tokens.labels(model).inc(event.usage.completion_tokens)
        self.kv_cache_tokens.labels(model).set(used)
        self.kv_cache_usage.labels(model).set(used / context_tokens if context_tokens else 0.0)
