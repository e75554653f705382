"""Tracing for every service with the OpenTelemetry SDK, configured by the standard OTEL_*
variables; spans for model calls follow the GenAI semantic conventions.

Each service builds one `Telemetry` in its `serve()` and passes it down: the gRPC and ASGI
instrumentations take the provider explicitly, so no process-wide provider is installed.
Spans are exported over OTLP only when an endpoint is set (or `OTEL_TRACES_EXPORTER` asks
for an exporter); otherwise they are made but dropped, which keeps trace ids flowing between
services and lets in-process span processors (the console's recent requests) see them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    MutableMapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, TypeVar

from meshllm.common.errors import ConfigError
from meshllm.common.types import Finished, GenerateEvent, GenerateRequest, SamplingParams
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace import Tracer as Tracer  # re-exported: services annotate with it
from opentelemetry.util.types import AttributeValue

log = logging.getLogger(__name__)
T = TypeVar("T")
ASGIApp = Callable[[MutableMapping[str, Any], Callable[..., Awaitable[Any]],
                    Callable[..., Awaitable[None]]], Awaitable[None]]

PROVIDER_NAME = "mesh-llm"  # gen_ai.provider.name: the mesh is the provider clients talk to
HEALTH_SERVICE = "grpc.health.v1.Health"  # probes would drown the real calls
# HTTP paths that are polled or held open for minutes: a span each would be noise.
UNTRACED_URLS = "/metrics,/health,/console,/api/status,/static/"
EXPORTERS = ("none", "otlp", "console")
PROTOCOLS = ("http/protobuf", "grpc")
DEFAULT_ENDPOINTS = {"http/protobuf": "http://localhost:4318/v1/traces",
                     "grpc": "http://localhost:4317"}
NO_TRACER: Tracer = trace.NoOpTracer()  # stateless: the default where tracing is not wired


class TelemetryError(ConfigError):
    """An OTEL_* variable has a value this process cannot use."""


@dataclass(frozen=True)
class TraceSettings:
    service_name: str
    exporters: tuple[str, ...] = ()           # each of EXPORTERS except "none"
    endpoint: str = ""                        # OTLP traces endpoint
    protocol: str = "http/protobuf"
    headers: tuple[tuple[str, str], ...] = ()
    resource: tuple[tuple[str, str], ...] = ()
    sampler: str = "parentbased_always_on"
    sampler_arg: float = 1.0


def _pairs(text: str) -> tuple[tuple[str, str], ...]:
    """`k1=v1,k2=v2` with URL-encoded values, as OTEL_RESOURCE_ATTRIBUTES and *_HEADERS use."""
    pairs = []
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            pairs.append((key.strip(), urllib.parse.unquote(value.strip())))
    return tuple(pairs)


def _endpoint(env: Mapping[str, str], protocol: str) -> str:
    specific = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if specific:
        return specific
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if base and protocol == "http/protobuf":
        return base.rstrip("/") + "/v1/traces"  # the spec appends the signal's path
    return base


def _exporters(env: Mapping[str, str], endpoint: str) -> tuple[str, ...]:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ()
    named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    chosen = tuple(n.strip() for n in named.split(",") if n.strip()) if named else (
        ("otlp",) if endpoint else ())
    for name in chosen:
        if name not in EXPORTERS:
            raise TelemetryError("OTEL_TRACES_EXPORTER", f"unknown exporter {name!r} "
                                 f"(supported: {', '.join(EXPORTERS)})")
    return tuple(n for n in chosen if n != "none")


def trace_settings(service: str, env: Mapping[str, str]) -> TraceSettings:
    """What the OTEL_* variables ask of this service (pure: `env` is passed in)."""
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
    if protocol not in PROTOCOLS:
        raise TelemetryError("OTEL_EXPORTER_OTLP_PROTOCOL", f"unsupported protocol "
                             f"{protocol!r} (supported: {', '.join(PROTOCOLS)})")
    endpoint = _endpoint(env, protocol)
    sampler = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "1").strip() or "1"
    try:
        ratio = float(arg)
    except ValueError:
        raise TelemetryError("OTEL_TRACES_SAMPLER_ARG", f"not a number: {arg!r}") from None
    headers = env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get(
        "OTEL_EXPORTER_OTLP_HEADERS", "")
    return TraceSettings(
        service_name=env.get("OTEL_SERVICE_NAME", "").strip() or f"mesh-llm-{service}",
        exporters=_exporters(env, endpoint), endpoint=endpoint, protocol=protocol,
        headers=_pairs(headers), resource=_pairs(env.get("OTEL_RESOURCE_ATTRIBUTES", "")),
        sampler=sampler, sampler_arg=ratio)


def build_sampler(name: str, ratio: float) -> sampling.Sampler:
    samplers: dict[str, Callable[[], sampling.Sampler]] = {
        "always_on": lambda: sampling.ALWAYS_ON,
        "always_off": lambda: sampling.ALWAYS_OFF,
        "traceidratio": lambda: sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": lambda: sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": lambda: sampling.ParentBased(
            sampling.TraceIdRatioBased(ratio)),
    }
    if name not in samplers:
        raise TelemetryError("OTEL_TRACES_SAMPLER", f"unsupported sampler {name!r} "
                             f"(supported: {', '.join(samplers)})")
    return samplers[name]()


def build_exporter(name: str, s: TraceSettings) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter(service_name=s.service_name)
    endpoint = s.endpoint or DEFAULT_ENDPOINTS[s.protocol]
    # Imported on use: a mesh that exports nothing never loads the OTLP stacks.
    if s.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )
        return GrpcExporter(endpoint=endpoint, headers=dict(s.headers),
                            insecure=endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter(endpoint=endpoint, headers=dict(s.headers))


@dataclass(frozen=True)
class Telemetry:
    provider: TracerProvider
    tracer: Tracer

    def shutdown(self) -> None:
        """Flush what is queued for export; call once when the service stops."""
        self.provider.shutdown()


def build_telemetry(settings: TraceSettings, instance: str = "",
                    processors: Sequence[SpanProcessor] = ()) -> Telemetry:
    attributes: dict[str, AttributeValue] = {
        "service.namespace": "mesh-llm", **dict(settings.resource),
        "service.name": settings.service_name}
    if instance:
        attributes["service.instance.id"] = instance
    provider = TracerProvider(resource=Resource.create(attributes),
                              sampler=build_sampler(settings.sampler, settings.sampler_arg))
    for name in settings.exporters:
        provider.add_span_processor(BatchSpanProcessor(build_exporter(name, settings)))
    for processor in processors:
        provider.add_span_processor(processor)
    if settings.exporters:
        log.info("traces of %s go to %s (%s)", settings.service_name,
                 settings.endpoint or "the default endpoint", ", ".join(settings.exporters))
    return Telemetry(provider, provider.get_tracer("meshllm"))


def setup_telemetry(service: str, env: Mapping[str, str], instance: str = "",
                    processors: Sequence[SpanProcessor] = ()) -> Telemetry:
    """The service's tracing, from OTEL_* in `env`; a bad value raises TelemetryError."""
    return build_telemetry(trace_settings(service, env), instance, processors)


# --- instrumentation: gRPC metadata and HTTP headers carry the trace context -------------


# Untraced calls: health probes (noise), and the tunnel that carries a split model's ggml
# RPC bytes: one stream for the model's whole life, where a span says nothing and the
# interceptor's per-message wrapping sits on every decode step's path.
UNTRACED_METHODS = ("/meshllm.v1.ShardWorker/Tunnel",)


def _traced(details: Any) -> bool:
    from opentelemetry.instrumentation.grpc import filters

    untraced = filters.any_of(filters.service_name(HEALTH_SERVICE),
                              *(filters.full_method_name(m) for m in UNTRACED_METHODS))
    return bool(filters.negate(untraced)(details))


def server_interceptors(tel: Telemetry) -> list[Any]:
    """For `grpc.aio.server(interceptors=...)`: a server span per call, parented by the
    caller's context from the metadata."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    # The instrumentation package ships no type hints; its factories return interceptors.
    return [aio_server_interceptor(  # type: ignore[no-untyped-call]
        tracer_provider=tel.provider, filter_=_traced)]


def client_interceptors(tel: Telemetry) -> list[Any]:
    """For `grpc.aio.insecure_channel(..., interceptors=...)`: a client span per call, and
    the current context injected into the call's metadata."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(  # type: ignore[no-untyped-call]
        tracer_provider=tel.provider, filter_=_traced))


def instrument_asgi(app: ASGIApp, tel: Telemetry, untraced: str = UNTRACED_URLS) -> ASGIApp:
    """The app behind a server span per HTTP request (W3C traceparent honoured)."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    wrapped: ASGIApp = OpenTelemetryMiddleware(
        app, excluded_urls=untraced, tracer_provider=tel.provider,
        exclude_spans=["receive", "send"])  # one span per streamed chunk would swamp traces
    return wrapped


# --- GenAI semantic conventions ------------------------------------------------------------


def operation_name(request: GenerateRequest) -> str:
    return "chat" if request.chat is not None else "text_completion"


def request_attributes(operation: str, model: str, s: SamplingParams
                       ) -> dict[str, AttributeValue]:
    attrs: dict[str, AttributeValue] = {
        "gen_ai.operation.name": operation, "gen_ai.provider.name": PROVIDER_NAME,
        "gen_ai.request.model": model, "gen_ai.request.temperature": s.temperature,
        "gen_ai.request.top_p": s.top_p}
    if s.max_tokens:
        attrs["gen_ai.request.max_tokens"] = s.max_tokens
    if s.seed is not None:  # attributes are signed 64-bit; the wire's seed is unsigned
        attrs["gen_ai.request.seed"] = s.seed - (1 << 64) if s.seed >= 1 << 63 else s.seed
    if s.stop:
        attrs["gen_ai.request.stop_sequences"] = list(s.stop)
    if s.top_k:
        attrs["gen_ai.request.top_k"] = s.top_k
    if s.presence_penalty:
        attrs["gen_ai.request.presence_penalty"] = s.presence_penalty
    if s.frequency_penalty:
        attrs["gen_ai.request.frequency_penalty"] = s.frequency_penalty
    return attrs


def finish_attributes(model: str, finished: Finished) -> dict[str, AttributeValue]:
    return {"gen_ai.response.model": model,
            "gen_ai.response.finish_reasons": [finished.finish_reason],
            "gen_ai.usage.input_tokens": finished.usage.prompt_tokens,
            "gen_ai.usage.output_tokens": finished.usage.completion_tokens}


@dataclass(frozen=True)
class GenAiCall:
    """One model call as a span: `{operation} {model}` with the request's attributes."""

    operation: str
    model: str
    sampling: SamplingParams
    kind: SpanKind = SpanKind.CLIENT
    extra: Mapping[str, AttributeValue] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.operation} {self.model}"


def api_call(kind: str, model: str, sampling: SamplingParams) -> GenAiCall:
    """The gateway's span for an OpenAI request (`kind`: "chat" or "completion")."""
    return GenAiCall("chat" if kind == "chat" else "text_completion", model, sampling)


def worker_call(request: GenerateRequest, worker_id: str) -> GenAiCall:
    return GenAiCall(operation_name(request), request.model_id, request.sampling,
                     SpanKind.INTERNAL, {"meshllm.request_id": request.request_id,
                                         "meshllm.worker_id": worker_id})


async def _next_within(ctx: otel_context.Context, items: AsyncIterator[T]) -> T | None:
    """The next item, computed with `ctx` current: what the inner generator starts (a gRPC
    call, an engine span) gets the right parent. Attached and detached within one step,
    because a generator may be resumed from another task than the one that started it."""
    token = otel_context.attach(ctx)
    try:
        return await anext(items, None)
    finally:
        otel_context.detach(token)


class _Watch:
    """What a stream of events tells about its call, written onto its span."""

    def __init__(self, span: Span, model: str) -> None:
        self.span = span
        self.model = model
        self.started_ns = time.monotonic_ns()
        self.first_token_s: float | None = None
        self.finished = False

    def see(self, event: GenerateEvent) -> None:
        if isinstance(event, Finished):
            self.finished = True
            self.span.set_attributes(finish_attributes(self.model, event))
        elif event.tokens and self.first_token_s is None:
            self.first_token_s = (time.monotonic_ns() - self.started_ns) / 1e9
            self.span.add_event("gen_ai.first_token")
            self.span.set_attribute("meshllm.time_to_first_token_s", self.first_token_s)


def _failed(span: Span, exc: BaseException) -> str:
    """The outcome of a call that raised; a client going away is no error of the call."""
    if isinstance(exc, GeneratorExit | asyncio.CancelledError):
        return "cancelled"
    span.record_exception(exc)
    span.set_attribute("error.type", type(exc).__name__)
    span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
    return "error"


async def traced_generation(tracer: Tracer, call: GenAiCall,
                            events: AsyncIterator[GenerateEvent]
                            ) -> AsyncGenerator[GenerateEvent, None]:
    """`events`, unchanged, inside a GenAI span that ends with the stream (finished,
    failed, or closed early by a client that went away)."""
    span = tracer.start_span(call.name, kind=call.kind, attributes={
        **request_attributes(call.operation, call.model, call.sampling), **call.extra})
    ctx = trace.set_span_in_context(span)
    watch = _Watch(span, call.model)
    outcome = "cancelled"
    try:
        while (event := await _next_within(ctx, events)) is not None:
            watch.see(event)
            yield event
        outcome = "ok" if watch.finished else "incomplete"
    except BaseException as exc:
        outcome = _failed(span, exc)
        raise
    finally:
        span.set_attribute("meshllm.outcome", outcome)
        span.end()
        if isinstance(events, AsyncGenerator):  # stops the call below when a client left
            await events.aclose()


def record_route(tracer: Tracer, model: str, candidates: Sequence[str]) -> None:
    """The routing decision as a span of its own: the replicas in the order they will be
    tried (the first is chosen; the rest are fallbacks)."""
    span = tracer.start_span(f"route {model}", attributes={
        "gen_ai.request.model": model, "meshllm.route.candidates": list(candidates),
        "meshllm.route.chosen": candidates[0] if candidates else ""})
    if not candidates:
        span.set_status(Status(StatusCode.ERROR, "no ready replica"))
    span.end()


# --- engine phases -------------------------------------------------------------------------


@dataclass(frozen=True)
class EnginePhases:
    """Wall-clock times (time.time_ns, comparable across processes on one host)."""

    submitted_ns: int        # the service handed the request to the engine
    started_ns: int          # the engine took it up, after waiting its turn
    first_token_ns: int      # prompt processed, first token sampled (0: none came)
    finished_ns: int


def phase_intervals(p: EnginePhases) -> list[tuple[str, int, int]]:
    """(name, start, end) of queueing, prompt processing and decoding; empty ones omitted."""
    started = min(max(p.started_ns, p.submitted_ns), p.finished_ns)
    first = min(max(p.first_token_ns, started), p.finished_ns) if p.first_token_ns else 0
    phases = [("engine.queue", p.submitted_ns, started),
              ("engine.prompt", started, first or p.finished_ns)]
    if first:
        phases.append(("engine.decode", first, p.finished_ns))
    return [(name, start, end) for name, start, end in phases if end >= start]


def record_engine_phases(tracer: Tracer, phases: EnginePhases,
                         attributes: Mapping[str, AttributeValue] | None = None) -> None:
    """Spans for the engine's phases, children of the current span, created after the
    fact from the times the engine reported."""
    for name, start, end in phase_intervals(phases):
        span = tracer.start_span(name, start_time=start, attributes=attributes)
        span.end(end_time=end)
