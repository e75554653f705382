"""`python -m meshllm.worker`: the shard-worker service."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence

from meshllm.common import grpcutil, lifecycle, store, telemetry
from meshllm.common.membership import Registration
from meshllm.common.meshview import follow_mesh
from meshllm.common.store import EtcdStore
from meshllm.v1 import worker_pb2_grpc
from meshllm.worker.config import WorkerConfig, load_config
from meshllm.worker.engines import ProcessEngine, engine_argv
from meshllm.worker.hosts import HostDeps, compute_env
from meshllm.worker.links import LinkMonitor
from meshllm.worker.metrics import WorkerMetrics
from meshllm.worker.plans import assigned_plans
from meshllm.worker.service import ShardWorkerServicer, Worker
from meshllm.worker.spare_cache import SparePrimer
from meshllm.worker.stage import StageServer, prime_stage_cache
from meshllm.worker.tunnel import TunnelListener
from meshllm.worker.warm_engines import WarmEngines

log = logging.getLogger("meshllm.worker")


async def follow_placements(worker: Worker, kv: store.KeyValueStore,
                            spares: SparePrimer | None) -> None:
    async for snapshot in follow_mesh(kv):
        worker.links.peers = {w.worker_id: w.address for w in snapshot.workers.values()
                              if w.worker_id != worker.worker_id}
        worker.observe(snapshot)
        if spares is not None:
            spares.follow(snapshot)
        await worker.apply(assigned_plans(snapshot, worker.worker_id))


def host_deps(config: WorkerConfig, tel: telemetry.Telemetry, warm: WarmEngines) -> HostDeps:
    direct = config.rpc_transport == "direct"
    advertised_host = config.advertise_address.rpartition(":")[0]
    return HostDeps(
        engine_factory=functools.partial(ProcessEngine, tracer=tel.tracer, warm=warm),
        tunnel_factory=functools.partial(TunnelListener, security=config.security),
        stage_factory=StageServer,
        stage_primer=prime_stage_cache if config.prime_stage_cache else None,
        threads=config.threads, stage_host=advertised_host if direct else "127.0.0.1",
        stage_cache_dir=config.cache_dir, direct_rpc=direct, weight_repack=config.weight_repack,
        restart_backoff_s=config.restart_backoff_s, max_queue=config.max_queue,
        rpc_library=config.rpc_library, log_level=config.log_level,
        child_env=config.child_env, data_dir=config.data_dir, security=config.security,
        worker_id=config.worker_id,
    )


def spare_primer(config: WorkerConfig) -> SparePrimer | None:
    if not config.prime_stage_cache:
        return None
    return SparePrimer(config.cache_dir, config.child_env, prime_stage_cache)


def background(worker: Worker, kv: store.KeyValueStore, registration: Registration,
               spares: SparePrimer | None) -> tuple[asyncio.Task[None], ...]:
    """The worker's long-running tasks. keep_alive handles its own failures. The others
    start over when they fail (the placement follower from a fresh snapshot, the link
    monitor from a new round: etcd writes while etcd restarts): a worker that serves must
    not stop serving for that."""
    restarts = lifecycle.restart_counter("worker", worker.metrics.registry)

    def supervised(name: str, factory: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        return asyncio.create_task(lifecycle.supervise(name, factory, restarts))

    return (asyncio.create_task(registration.keep_alive(), name="keep-alive"),
            supervised("placements", lambda: follow_placements(worker, kv, spares)),
            supervised("links", lambda: worker.links.run(worker.publish)),
            supervised("inventory", lambda: worker.inventory.run(
                lambda: worker.mesh.models.values(), worker.publish)),
            *([] if spares is None else [supervised("spare stages", spares.run)]))


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
    warm = WarmEngines()
    # Ready for the first load of a model with default (reproducible) numerics.
    warm.prepare(engine_argv(config.log_level), compute_env(config.child_env, True))
    worker = Worker(config, registration, health, host_deps(config, tel, warm), links, metrics)
    worker_pb2_grpc.add_ShardWorkerServicer_to_server(ShardWorkerServicer(worker, tel.tracer),
                                                  server)
    await server.start()
    lifecycle.start_metrics(config.metrics_port, metrics.registry)
    await worker.publish()
    log.info("worker %s on port %d, budget %d MB, %d threads", config.worker_id, port,
             config.memory_budget_bytes // 10**6, config.threads)
    tasks = background(worker, kv, registration, spare_primer(config))
    try:
        await lifecycle.stop_or_fail(stop, *tasks)
    finally:
        await server.stop(grace=2.0)
        await worker.close()
        await warm.close()
        await registration.withdraw()
        await kv.close()
        tel.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    return lifecycle.service_main("worker", load_config, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
