"""Instrumentation: gRPC metadata and HTTP headers carry the trace context."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from meshllm.common.telemetry.settings import Telemetry

ASGIApp = Callable[[MutableMapping[str, Any], Callable[..., Awaitable[Any]],
                    Callable[..., Awaitable[None]]], Awaitable[None]]

HEALTH_SERVICE = "grpc.health.v1.Health"  # probes would drown the real calls

# Untraced calls: health probes (noise), and the tunnel that carries a split model's ggml
# RPC bytes: one stream for the model's whole life, where a span says nothing and the
# interceptor's per-message wrapping sits on every decode step's path.
# Streams that live as long as a model or a peer link: one span for hours of frames.
UNTRACED_METHODS = ("/meshllm.v1.ShardWorker/Tunnel", "/meshllm.v1.Blackboard/Gossip")


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


def instrument_asgi(app: ASGIApp, tel: Telemetry, untraced: Sequence[str]) -> ASGIApp:
    """The app behind a server span per HTTP request (W3C traceparent honoured), except
    for the paths `untraced` starts with (the service's polled or long-held ones)."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    wrapped: ASGIApp = OpenTelemetryMiddleware(
        app, excluded_urls=",".join(untraced), tracer_provider=tel.provider,
        exclude_spans=["receive", "send"])  # one span per streamed chunk would swamp traces
    return wrapped
