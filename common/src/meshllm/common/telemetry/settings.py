"""What the OTEL_* variables ask for, and the tracer provider built from it.

Spans are exported over OTLP only when an endpoint is set (or `OTEL_TRACES_EXPORTER` asks
for an exporter); otherwise they are made but dropped, which keeps trace ids flowing between
services.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from meshllm.common.errors import ConfigError
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Tracer
from opentelemetry.util.types import AttributeValue

log = logging.getLogger(__name__)

EXPORTERS = ("none", "otlp", "console")
PROTOCOLS = ("http/protobuf", "grpc")
DEFAULT_ENDPOINTS = {"http/protobuf": "http://localhost:4318/v1/traces",
                     "grpc": "http://localhost:4317"}


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

