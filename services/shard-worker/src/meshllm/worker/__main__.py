"""`python -m meshllm.worker`: the shard-worker service."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import Sequence

from meshllm.common import grpcutil, lifecycle, store, telemetry
from meshllm.common.membership import Registration
from meshllm.common.meshview import follow_mesh
from meshllm.common.store import EtcdStore
from meshllm.v1 import worker_pb2_grpc
from meshllm.worker.config import WorkerConfig, load_config
from meshllm.worker.engines import ProcessEngine
from meshllm.worker.hosts import HostDeps
from meshllm.worker.links import LinkMonitor
from meshllm.worker.metrics import WorkerMetrics
from meshllm.worker.plans import assigned_plans
from meshllm.worker.service import ShardWorkerServicer, Worker
from meshllm.worker.stage import StageServer
from meshllm.worker.tunnel import TunnelListener

log = logging.getLogger("meshllm.worker")


async def follow_placements(worker: Worker, kv: store.KeyValueStore) -> None:
    async for snapshot in follow_mesh(kv):
        worker.links.peers = {w.worker_id: w.address for w in snapshot.workers.values()
                              if w.worker_id != worker.worker_id}
        await worker.apply(assigned_plans(snapshot, worker.worker_id))


def host_deps(config: WorkerConfig, tel: telemetry.Telemetry) -> HostDeps:
    direct = config.rpc_transport == "direct"
    advertised_host = config.advertise_address.rpartition(":")[0]
    return HostDeps(
        engine_factory=functools.partial(ProcessEngine, tracer=tel.tracer),
        tunnel_factory=functools.partial(TunnelListener, security=config.security),
        stage_factory=StageServer,
        threads=config.threads, stage_host=advertised_host if direct else "127.0.0.1",
        stage_cache_dir=config.cache_dir, direct_rpc=direct, weight_repack=config.weight_repack,
        restart_backoff_s=config.restart_backoff_s, max_queue=config.max_queue,
        rpc_library=config.rpc_library, log_level=config.log_level,
        child_env=config.child_env, data_dir=config.data_dir,
    )


async def serve(config: WorkerConfig, stop: asyncio.Event) -> None:
    kv = EtcdStore(config.etcd_url, config.security)
    await lifecycle.unless_stopped(stop, kv.connect())
    tel = telemetry.build_telemetry(config.trace, instance=config.worker_id)
    server, health, port = grpcutil.new_server(config.listen, telemetry.server_interceptors(tel),
                                                config.security)
    registration = Registration(kv, store.WORKERS + config.worker_id, config.lease)
    metrics = WorkerMetrics()
    metrics.watch_lease(lambda: registration.lease_ok)
    links = LinkMonitor(config.worker_id, config.ping_interval_s, config.security)
    worker = Worker(config, registration, health, host_deps(config, tel), links, metrics)
    worker_pb2_grpc.add_ShardWorkerServicer_to_server(ShardWorkerServicer(worker, tel.tracer),
                                                  server)
    await server.start()
    lifecycle.start_metrics(config.metrics_port, metrics.registry)
    await worker.publish()
    log.info("worker %s on port %d, budget %d MB, %d threads", config.worker_id, port,
             config.memory_budget_bytes // 10**6, config.threads)
    # keep_alive handles its own failures. The placement follower starts over from a fresh
    # snapshot and the link monitor from a new round when they fail (etcd writes while etcd
    # restarts): a worker that serves must not stop serving for that.
    restarts = lifecycle.restart_counter("worker", metrics.registry)
    tasks = (asyncio.create_task(registration.keep_alive(), name="keep-alive"),
             asyncio.create_task(lifecycle.supervise(
                 "placements", lambda: follow_placements(worker, kv), restarts)),
             asyncio.create_task(lifecycle.supervise(
                 "links", lambda: links.run(worker.publish), restarts)))
    try:
        await lifecycle.stop_or_fail(stop, *tasks)
    finally:
        await server.stop(grace=2.0)
        await worker.close()
        await registration.withdraw()
        await kv.close()
        tel.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    return lifecycle.service_main("worker", load_config, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
