"""`python -m meshllm.gateway`: the OpenAI-compatible HTTP gateway."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Collection, Sequence
from typing import Any

import uvicorn
from meshllm.common import lifecycle, telemetry
from meshllm.common.blackboard.client import BlackboardClient
from meshllm.common.store import EtcdStore
from meshllm.common.types import ModelId
from meshllm.gateway.app import Api, DemandView, build_app
from meshllm.gateway.auth import KeyRing, exposure_warning
from meshllm.gateway.backend import MeshBackend
from meshllm.gateway.blackboard_api import blackboard_routes
from meshllm.gateway.config import GatewayConfig, load_config
from meshllm.gateway.console import console_routes
from meshllm.gateway.demand import DemandMeter, DemandPublisher
from meshllm.gateway.gate import Gate, front_door, gate_routes
from meshllm.gateway.metrics import GatewayMetrics
from meshllm.gateway.models_api import ModelsApi, models_routes
from meshllm.gateway.status_stream import StatusStream
from meshllm.gateway.suspects import SuspectReporter
from starlette.routing import BaseRoute

log = logging.getLogger("meshllm.gateway")
# Paths (prefixes) that are polled or held open for minutes: a span each would be noise.
UNTRACED_PATHS = ("/metrics", "/health", "/console", "/api/status", "/static/")


async def serve(config: GatewayConfig, stop: asyncio.Event) -> None:
    if warning := exposure_warning(config.host, bool(config.api_keys)):
        log.warning(warning)
    kv = EtcdStore(config.etcd_url, config.security)
    await lifecycle.unless_stopped(stop, kv.connect())
    tel = telemetry.build_telemetry(config.trace)
    metrics = GatewayMetrics()
    backend = mesh_backend(kv, config, tel, metrics)
    publisher = demand_publisher(kv, config, backend)
    blackboard = (BlackboardClient(config.blackboard_address, security=config.security,
                                   interceptors=telemetry.client_interceptors(tel))
                  if config.blackboard_address else None)
    extra = extra_routes(kv, backend, metrics, blackboard, publisher.mesh_view)
    app = front_door(build_app(Api(backend, metrics, tel.tracer, publisher.mesh_view), extra),
                     Gate(KeyRing(config.api_keys), config.limits), config.cors_origins)
    server = http_server(config, telemetry.instrument_asgi(app, tel, UNTRACED_PATHS))
    # The mesh follower starts over from a fresh snapshot when it fails; the HTTP server
    # ending (its port taken...) stops the gateway.
    restarts = lifecycle.restart_counter("gateway", metrics.registry)
    follower = asyncio.create_task(lifecycle.supervise("mesh-follower", backend.follow,
                                                       restarts))
    serving = asyncio.create_task(server.serve())
    publishing = asyncio.create_task(publisher.run())  # withdraws its record when cancelled
    log.info("gateway on %s://%s:%d/v1", "https" if config.https else "http", config.host,
             config.port)
    try:
        await lifecycle.stop_or_fail(stop, follower, serving)
    finally:
        server.should_exit = True
        publishing.cancel()
        await asyncio.gather(serving, publishing, return_exceptions=True)
        await backend.close()
        if blackboard is not None:
            await blackboard.close()
        await kv.close()
        tel.shutdown()


def mesh_backend(kv: EtcdStore, config: GatewayConfig, tel: telemetry.Telemetry,
                 metrics: GatewayMetrics) -> MeshBackend:
    return MeshBackend(kv, config.timing,
                       tel.tracer, telemetry.client_interceptors(tel), config.security,
                       DemandMeter(window_s=config.demand.window_s,
                                   recent_s=config.demand.recent_s),
                       routing_metrics=metrics.routing,
                       suspects=SuspectReporter(kv, config.demand.gateway_id))


def extra_routes(kv: EtcdStore, backend: MeshBackend, metrics: GatewayMetrics,
                 blackboard: BlackboardClient | None, demand: DemandView) -> list[BaseRoute]:
    """The routes beside the OpenAI API: console, blackboard, gate, model management."""
    return [*console_routes(StatusStream(backend, metrics.registry, metrics.recent, demand)),
            *(blackboard_routes(blackboard) if blackboard else []), *gate_routes(),
            *models_routes(ModelsApi(kv, backend))]


def demand_publisher(kv: EtcdStore, config: GatewayConfig, backend: MeshBackend
                     ) -> DemandPublisher:
    """Publishes the backend's demand meter; a model stays in the record while the mesh
    knows it (declared or described), so the planner sees how long it has been idle."""
    def known() -> Collection[ModelId]:
        return backend.snapshot.declarations.keys() | backend.snapshot.models.keys()
    return DemandPublisher(kv, backend.demand, config.demand.gateway_id, known,
                           lambda: backend.snapshot.demand, config.demand.publish_s)


def http_server(config: GatewayConfig, app: Any) -> uvicorn.Server:
    https = config.https
    return uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=5,
        ssl_certfile=str(https.cert) if https else None,
        ssl_keyfile=str(https.key) if https else None,
    ))


def main(argv: Sequence[str] | None = None) -> int:
    return lifecycle.service_main("gateway", load_config, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
