"""Telemetry and console building blocks, in process (no mesh)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import cast

import pytest
from meshllm.common import telemetry
from meshllm.common.errors import ConfigError
from meshllm.common.meshview import MeshSnapshot
from meshllm.common.store import KeyValueStore
from meshllm.common.suspects import NO_ANSWER, PLANNER, SuspectReport
from meshllm.common.types import (
    Finished,
    GenerateEvent,
    SamplingParams,
    TokenDelta,
    Usage,
    WorkerId,
    WorkerInfo,
)
from meshllm.gateway.__main__ import UNTRACED_PATHS
from meshllm.gateway.app import Api, build_app
from meshllm.gateway.backend import MeshBackend
from meshllm.gateway.config import StreamTiming
from meshllm.gateway.metrics import GatewayMetrics
from meshllm.gateway.openai_api import ApiRequest
from meshllm.gateway.recent import RecentRequests, RequestRecord
from meshllm.gateway.status_stream import TokenRate, console_state, rates
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry, Counter
from starlette.testclient import TestClient


def test_no_endpoint_means_no_exporter() -> None:
    s = telemetry.trace_settings("gateway", {})
    assert s.exporters == () and s.service_name == "mesh-llm-gateway"


def test_endpoint_turns_on_otlp_with_the_signal_path() -> None:
    s = telemetry.trace_settings("worker", {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
        "OTEL_EXPORTER_OTLP_HEADERS": "api-key=a%20b", "OTEL_SERVICE_NAME": "w1",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test"})
    assert s.exporters == ("otlp",)
    assert s.endpoint == "http://collector:4318/v1/traces"
    assert s.headers == (("api-key", "a b"),) and s.service_name == "w1"
    assert s.resource == (("deployment.environment", "test"),)


def test_grpc_protocol_keeps_the_endpoint_and_none_wins() -> None:
    s = telemetry.trace_settings("planner", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317",
                                             "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert (s.endpoint, s.exporters) == ("http://c:4317", ("otlp",))
    off = telemetry.trace_settings("planner", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c",
                                               "OTEL_TRACES_EXPORTER": "none"})
    assert off.exporters == ()


@pytest.mark.parametrize("env", [{"OTEL_TRACES_EXPORTER": "zipkin"},
                                 {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
                                 {"OTEL_TRACES_SAMPLER": "sometimes"}])
def test_bad_values_are_config_errors(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="OTEL_"):
        telemetry.build_telemetry(telemetry.trace_settings("gateway", env))


def test_phases_are_ordered_and_clamped() -> None:
    p = telemetry.EnginePhases(submitted_ns=100, started_ns=150, first_token_ns=400,
                               finished_ns=900)
    assert telemetry.phase_intervals(p) == [("engine.queue", 100, 150),
                                            ("engine.prompt", 150, 400),
                                            ("engine.decode", 400, 900)]
    no_token = telemetry.EnginePhases(100, 50, 0, 300)  # clock skew: started before submit
    assert telemetry.phase_intervals(no_token) == [("engine.queue", 100, 100),
                                                   ("engine.prompt", 100, 300)]


def _traced(env: dict[str, str] | None = None
            ) -> tuple[telemetry.Telemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tel = telemetry.build_telemetry(telemetry.trace_settings("gateway", env or {}),
                                    processors=[SimpleSpanProcessor(exporter)])
    return tel, exporter


async def _events() -> AsyncGenerator[GenerateEvent, None]:
    yield TokenDelta("Hel", 1)
    yield TokenDelta("lo", 1)
    yield Finished("stop", Usage(7, 2))


async def test_traced_generation_sets_genai_attributes() -> None:
    tel, exporter = _traced()
    call = telemetry.api_call("chat", "m1", SamplingParams(max_tokens=5, temperature=0.5))
    seen = [e async for e in telemetry.traced_generation(tel.tracer, call, _events())]
    assert len(seen) == 3
    (span,) = exporter.get_finished_spans()
    attrs = dict(span.attributes or {})
    assert span.name == "chat m1" and span.kind is SpanKind.CLIENT
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "m1" and attrs["gen_ai.request.max_tokens"] == 5
    assert attrs["gen_ai.usage.input_tokens"] == 7 and attrs["gen_ai.usage.output_tokens"] == 2
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert attrs["meshllm.outcome"] == "ok"


async def test_inner_spans_are_children_and_errors_are_recorded() -> None:
    tel, exporter = _traced()

    async def failing() -> AsyncGenerator[GenerateEvent, None]:
        telemetry.record_route(tel.tracer, "m1", ["w1", "w2"])
        yield TokenDelta("x", 1)
        raise RuntimeError("worker went away")

    call = telemetry.api_call("completion", "m1", SamplingParams())
    with pytest.raises(RuntimeError):
        async for _ in telemetry.traced_generation(tel.tracer, call, failing()):
            pass
    route, outer = exporter.get_finished_spans()
    assert route.parent is not None and outer.context is not None
    assert route.parent.span_id == outer.context.span_id
    assert dict(route.attributes or {})["meshllm.route.chosen"] == "w1"
    assert outer.status.status_code is StatusCode.ERROR
    assert dict(outer.attributes or {})["error.type"] == "RuntimeError"


async def test_closing_early_is_a_cancellation() -> None:
    tel, exporter = _traced()
    stream = telemetry.traced_generation(
        tel.tracer, telemetry.api_call("chat", "m1", SamplingParams()), _events())
    await anext(stream)
    await stream.aclose()
    (span,) = exporter.get_finished_spans()
    assert dict(span.attributes or {})["meshllm.outcome"] == "cancelled"
    assert span.status.status_code is not StatusCode.ERROR


def test_token_rate_from_counters() -> None:
    registry = CollectorRegistry()
    tokens = Counter("meshllm_gateway_completion_tokens", "t", ["model"], registry=registry)
    rate = TokenRate(registry, window_s=10)
    assert rate.sample(0.0) == {}
    tokens.labels("m1").inc(30)
    assert rate.sample(2.0) == {"m1": 15.0}
    assert rates((0.0, {"m1": 5.0}), (0.0, {"m1": 9.0})) == {"m1": 0.0}


def test_console_state_is_plain_data() -> None:
    state = console_state(MeshSnapshot(), {}, {"m1": 3.0}, [], 1000.0, 5.0)
    assert state == {"at_unix_s": 1000.0, "nodes": [], "models": [], "suspects": [],
                     "tokens_per_s": 3.0, "recent": []}


def test_the_console_is_told_which_workers_are_planned_around() -> None:
    worker = WorkerInfo(WorkerId("w1"), "127.0.0.1:1", "cpu", 1 << 30, 1, 50.0)
    report = SuspectReport(WorkerId("w1"), 50.0, "gw-1", "sent nothing for 2.0 s", 900.0)
    verdict = SuspectReport(WorkerId("w1"), 50.0, PLANNER, NO_ANSWER, 901.0)
    snapshot = MeshSnapshot(workers={worker.worker_id: worker},
                            suspects={worker.worker_id: report},
                            left_out={worker.worker_id: verdict})
    state = console_state(snapshot, {}, {}, [], 1000.0, 5.0)
    assert state["suspects"] == [{"worker_id": "w1", "state": "left_out", "left_out": True,
                                  "since_unix_s": 901.0, "reporter": "gw-1",
                                  "reason": "sent nothing for 2.0 s"}]


def _answer(metrics: GatewayMetrics, request_id: str) -> None:
    """What the gateway's handler tells the timer of a request answered in two tokens."""
    timer = metrics.request_timer("m1", "chat", request_id)
    timer.first_token()
    timer.tokens(1)
    timer.tokens(1)
    timer.finished(Finished("stop", Usage(7, 2)))
    timer.done("ok")


@pytest.mark.parametrize("sampler", ["always_off", "parentbased_always_off"])
def test_requests_are_recorded_with_tracing_off(sampler: str) -> None:
    tel, exporter = _traced({"OTEL_TRACES_SAMPLER": sampler})
    metrics = GatewayMetrics()
    with tel.tracer.start_as_current_span("POST /v1/chat/completions"):  # as the ASGI app
        _answer(metrics, "chatcmpl-1")
    assert exporter.get_finished_spans() == ()
    (record,) = metrics.recent.latest()
    assert (record.request_id, record.model, record.operation, record.outcome) == (
        "chatcmpl-1", "m1", "chat", "ok")
    assert (record.finish_reason, record.input_tokens, record.output_tokens) == ("stop", 7, 2)
    assert record.ttft_s is not None and 0 <= record.ttft_s <= record.duration_s
    assert record.trace_id == ""  # no span was sampled: nothing to look the trace up by


def test_a_sampled_request_keeps_its_trace_id() -> None:
    tel, exporter = _traced()
    metrics = GatewayMetrics()
    with tel.tracer.start_as_current_span("POST /v1/chat/completions"):
        _answer(metrics, "chatcmpl-2")
    (span,) = exporter.get_finished_spans()
    (record,) = metrics.recent.latest()
    assert span.context is not None and record.trace_id == format(span.context.trace_id, "032x")


def test_a_request_that_failed_midway_counts_the_tokens_it_got() -> None:
    metrics = GatewayMetrics()
    timer = metrics.request_timer("m1", "completion", "cmpl-3")
    timer.first_token()
    timer.tokens(3)
    timer.done("error")
    timer.done("ok")  # once only
    (record,) = metrics.recent.latest()
    assert (record.operation, record.outcome, record.finish_reason) == (
        "text_completion", "error", "")
    assert (record.input_tokens, record.output_tokens, record.trace_id) == (0, 3, "")


def test_recent_requests_keep_the_newest_first() -> None:
    recent = RecentRequests(size=3)
    for i in range(5):
        recent.add(RequestRecord(float(i), f"r{i}", "m1", "chat", "ok", "stop", 1, 1, 0.1,
                                 0.05, ""))
    assert [r.request_id for r in recent.latest()] == ["r4", "r3", "r2"]
    state = console_state(MeshSnapshot(), {}, {}, recent.latest(), 1000.0, 5.0)
    assert state["recent"][0] == {
        "at_unix_s": 4.0, "request_id": "r4", "model": "m1", "operation": "chat",
        "outcome": "ok", "finish_reason": "stop", "input_tokens": 1, "output_tokens": 1,
        "duration_s": 0.1, "ttft_s": 0.05, "trace_id": ""}


class AnsweringBackend(MeshBackend):
    """Answers every request with "Hello" in two tokens."""

    def __init__(self) -> None:
        super().__init__(cast(KeyValueStore, object()), StreamTiming(1.0, 1.0))

    async def generate(self, req: ApiRequest) -> AsyncGenerator[GenerateEvent, None]:
        async for event in _events():
            yield event


def _response_id(body: str, stream: bool) -> str:
    if not stream:
        return str(json.loads(body)["id"])
    first = next(line for line in body.splitlines() if line.startswith("data: {"))
    return str(json.loads(first.removeprefix("data: "))["id"])


@pytest.mark.parametrize("sampler", ["always_on", "always_off"])
@pytest.mark.parametrize("stream", [False, True])
def test_the_gateway_records_every_request(stream: bool, sampler: str) -> None:
    """Through the app as served (behind the ASGI tracing middleware): one record per
    request, sampled or not; its trace id is the request's trace when it was sampled."""
    tel, exporter = _traced({"OTEL_TRACES_SAMPLER": sampler})
    metrics = GatewayMetrics()
    app = build_app(Api(AnsweringBackend(), metrics, tel.tracer))
    client = TestClient(telemetry.instrument_asgi(app, tel, UNTRACED_PATHS))
    body = {"model": "m1", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    (record,) = metrics.recent.latest()
    assert record.request_id == _response_id(response.text, stream)
    assert (record.model, record.operation, record.outcome, record.finish_reason) == (
        "m1", "chat", "ok", "stop")
    assert (record.input_tokens, record.output_tokens) == (7, 2)
    traces = {format(s.context.trace_id, "032x") for s in exporter.get_finished_spans()
              if s.context is not None}
    assert record.trace_id == ("" if sampler == "always_off" else traces.pop())
    assert not traces
    client.get("/api/status")
    assert len(metrics.recent.latest()) == 1  # only model calls are requests here
