"""Tracing for every service with the OpenTelemetry SDK, configured by the standard OTEL_*
variables; spans for model calls follow the GenAI semantic conventions.

Each service builds one `Telemetry` in its `serve()` and passes it down: the gRPC and ASGI
instrumentations take the provider explicitly, so no process-wide provider is installed.

`settings`: OTEL_* -> TraceSettings -> the provider; `instrument`: gRPC interceptors and the
ASGI middleware; `genai`: spans for model calls and the engine's phases. Services use the
names below as `telemetry.X`.
"""

from meshllm.common.telemetry.genai import (
    NO_TRACER,
    PROVIDER_NAME,
    EnginePhases,
    GenAiCall,
    Tracer,
    api_call,
    api_operation,
    current_trace_id,
    finish_attributes,
    operation_name,
    phase_intervals,
    record_engine_phases,
    record_migration,
    record_route,
    request_attributes,
    traced_generation,
    worker_call,
)
from meshllm.common.telemetry.instrument import (
    HEALTH_SERVICE,
    UNTRACED_METHODS,
    ASGIApp,
    client_interceptors,
    instrument_asgi,
    server_interceptors,
)
from meshllm.common.telemetry.settings import (
    DEFAULT_ENDPOINTS,
    EXPORTERS,
    PROTOCOLS,
    Telemetry,
    TelemetryError,
    TraceSettings,
    build_exporter,
    build_sampler,
    build_telemetry,
    setup_telemetry,
    trace_settings,
)

__all__ = [
    "DEFAULT_ENDPOINTS", "EXPORTERS", "HEALTH_SERVICE", "NO_TRACER", "PROTOCOLS",
    "PROVIDER_NAME", "UNTRACED_METHODS", "ASGIApp", "EnginePhases", "GenAiCall", "Telemetry",
    "TelemetryError", "TraceSettings", "Tracer", "api_call", "api_operation",
    "build_exporter", "build_sampler", "build_telemetry", "client_interceptors",
    "current_trace_id", "finish_attributes", "instrument_asgi", "operation_name",
    "phase_intervals", "record_engine_phases", "record_migration", "record_route",
    "request_attributes",
    "server_interceptors", "setup_telemetry", "trace_settings", "traced_generation",
    "worker_call",
]
