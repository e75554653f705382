"""`python -m meshllm.planner`: the planner service."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
from collections.abc import Sequence

from meshllm.common import grpcutil, lifecycle, models, telemetry
from meshllm.common.store import EtcdStore
from meshllm.common.types import ModelSpec
from meshllm.planner.config import PlannerConfig, load_config
from meshllm.planner.place import PlacementPolicy
from meshllm.planner.service import PlacementBoard, Planner, PlannerServicer
from meshllm.v1 import planner_pb2_grpc

log = logging.getLogger("meshllm.planner")


async def describe_models(config: PlannerConfig) -> list[ModelSpec]:
    specs = []
    for source in config.models:
        log.info("reading model %s", source)
        spec = await asyncio.to_thread(models.describe, source, config.context_length_tokens,
                                       source in config.split)
        mode = config.speculative.get(source, config.speculative.get("*", "none"))
        template = config.chat_templates.get(source, config.chat_templates.get("*", ""))
        spec = dataclasses.replace(spec, slots=config.slots, speculative=mode,
                                   chat_template=template)
        log.info("model %s: %d layers, %d MB weights, context %d", spec.model_id,
                 spec.n_layers, spec.weights_bytes // 10**6, spec.context_length)
        specs.append(spec)
    return specs


async def serve(config: PlannerConfig, stop: asyncio.Event) -> None:
    kv = EtcdStore(config.etcd_url, config.security)
    await lifecycle.unless_stopped(stop, kv.connect())
    specs = await lifecycle.unless_stopped(stop, describe_models(config))
    board = PlacementBoard()
    tel = telemetry.build_telemetry(config.trace)
    server, health, port = grpcutil.new_server(config.listen, telemetry.server_interceptors(tel),
                                                config.security)
    planner_pb2_grpc.add_PlannerServicer_to_server(PlannerServicer(board), server)
    await server.start()
    lifecycle.start_metrics(config.metrics_port)
    policy = PlacementPolicy(config.engine_overhead_bytes, config.max_replicas,
                             max_link_rtt_ms=config.max_link_rtt_ms)
    planner = Planner(kv, specs, policy, board, config.debounce_s)
    # On a failure (an etcd write while etcd restarts) the planner starts over: it publishes
    # the models again, reads the placements back and re-plans from a fresh snapshot.
    task = asyncio.create_task(lifecycle.supervise(
        "planner", planner.run, lifecycle.restart_counter("planner")))
    await health.set("", grpcutil.SERVING)
    log.info("planner serving on port %d", port)
    try:
        await lifecycle.stop_or_fail(stop, task)
    finally:
        await server.stop(grace=1.0)
        await kv.close()
        tel.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    return lifecycle.service_main("planner", load_config, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
