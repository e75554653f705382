"""`python -m meshllm.planner`: the planner service."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence

from meshllm.common import grpcutil, lifecycle, telemetry
from meshllm.common.store import EtcdStore
from meshllm.common.types import WorkerInfo
from meshllm.planner.assign import RoundPolicy
from meshllm.planner.config import PlannerConfig, load_config
from meshllm.planner.declared import ModelCatalog, describer, start_declarations
from meshllm.planner.place import PlacementPolicy
from meshllm.planner.service import PlacementBoard, Planner, PlannerServicer, PlannerSettings
from meshllm.planner.suspects import SuspectMetrics, SuspectProbes
from meshllm.v1 import planner_pb2_grpc

log = logging.getLogger("meshllm.planner")


def settings(config: PlannerConfig) -> PlannerSettings:
    placement = PlacementPolicy(config.engine_overhead_bytes, config.max_replicas,
                                max_link_rtt_ms=config.max_link_rtt_ms,
                                expert_hot_share=config.expert_hot_share)
    policy = RoundPolicy(placement, config.rebalance, config.fill_free_memory)
    return PlannerSettings(tuple(start_declarations(config)), policy, config.debounce_s,
                           config.interval_s)


def health_check(config: PlannerConfig) -> Callable[[WorkerInfo], Awaitable[bool]]:
    async def check(worker: WorkerInfo) -> bool:
        return await grpcutil.answers_health(worker.address, config.suspects.probe_timeout_s,
                                             config.security)
    return check


async def serve(config: PlannerConfig, stop: asyncio.Event) -> None:
    kv = EtcdStore(config.etcd_url, config.security)
    await lifecycle.unless_stopped(stop, kv.connect())
    board = PlacementBoard()
    tel = telemetry.build_telemetry(config.trace)
    server, health, port = grpcutil.new_server(config.listen, telemetry.server_interceptors(tel),
                                                config.security)
    planner_pb2_grpc.add_PlannerServicer_to_server(PlannerServicer(board), server)
    await server.start()
    lifecycle.start_metrics(config.metrics_port)
    planner = Planner(kv, settings(config), ModelCatalog(describer(config)), board,
                      SuspectProbes(health_check(config), config.suspects, SuspectMetrics()))
    # On a failure (an etcd write while etcd restarts) the planner starts over: it declares
    # the --models again if absent, reads the placements back and re-plans from a fresh
    # snapshot (the models already described are not read again).
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
