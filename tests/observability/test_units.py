"""Telemetry and console building blocks, in process (no mesh)."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import pytest
from meshllm.common import telemetry
from meshllm.common.errors import ConfigError
from meshllm.common.meshview import MeshSnapshot
from meshllm.common.types import Finished, GenerateEvent, SamplingParams, TokenDelta, Usage
from meshllm.gateway.status_stream import (
    RecentRequests,
    TokenRate,
    console_state,
    rates,
    record_from_span,
)
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry, Counter


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


def _traced() -> tuple[telemetry.Telemetry, InMemorySpanExporter, RecentRequests]:
    exporter, recent = InMemorySpanExporter(), RecentRequests()
    tel = telemetry.build_telemetry(telemetry.trace_settings("gateway", {}),
                                    processors=[SimpleSpanProcessor(exporter), recent])
    return tel, exporter, recent


async def _events() -> AsyncGenerator[GenerateEvent, None]:
    yield TokenDelta("Hel", 1)
    yield TokenDelta("lo", 1)
    yield Finished("stop", Usage(7, 2))


async def test_traced_generation_sets_genai_attributes() -> None:
    tel, exporter, recent = _traced()
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
    (record,) = recent.latest()
    assert (record.model, record.output_tokens, record.finish_reason) == ("m1", 2, "stop")


async def test_inner_spans_are_children_and_errors_are_recorded() -> None:
    tel, exporter, _ = _traced()

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
    tel, exporter, _ = _traced()
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
    assert state == {"at_unix_s": 1000.0, "nodes": [], "models": [], "tokens_per_s": 3.0,
                     "recent": []}


def test_only_client_genai_spans_become_records() -> None:
    tel, exporter, _ = _traced()
    tel.tracer.start_span("GET /v1/models", kind=SpanKind.SERVER).end()
    (span,) = exporter.get_finished_spans()
    assert record_from_span(span) is None
