"""`python -m meshllm.worker`: the shard-worker service."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from meshllm.common import grpcutil, lifecycle, store
from meshllm.common.membership import Registration
from meshllm.common.meshview import follow_mesh
from meshllm.common.store import EtcdStore
from meshllm.v1 import worker_pb2_grpc
from meshllm.worker.config import WorkerConfig, load_config
from meshllm.worker.engine import ProcessEngine
from meshllm.worker.service import ShardWorkerServicer, Worker, assigned_models

log = logging.getLogger("meshllm.worker")


async def follow_placements(worker: Worker, kv: store.KeyValueStore) -> None:
    async for snapshot in follow_mesh(kv):
        await worker.apply(assigned_models(snapshot, worker.worker_id))


async def serve(config: WorkerConfig, stop: asyncio.Event) -> None:
    kv = EtcdStore(config.etcd_url)
    await kv.connect()
    server, health, port = grpcutil.new_server(config.listen)
    registration = Registration(kv, store.WORKERS + config.worker_id, config.lease)
    worker = Worker(config, registration, health, ProcessEngine)
    worker_pb2_grpc.add_ShardWorkerServicer_to_server(ShardWorkerServicer(worker), server)
    await server.start()
    lifecycle.start_metrics(config.metrics_port)
    await worker.publish()
    log.info("worker %s on port %d, budget %d MB, %d threads", config.worker_id, port,
             config.memory_budget_bytes // 10**6, config.threads)
    tasks = (asyncio.create_task(registration.keep_alive()),
             asyncio.create_task(follow_placements(worker, kv)))
    try:
        await lifecycle.stop_or_fail(stop, *tasks)
    finally:
        await server.stop(grace=2.0)
        await worker.close()
        await registration.withdraw()
        await kv.close()


def main(argv: Sequence[str] | None = None) -> int:
    return lifecycle.service_main("worker", load_config, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
