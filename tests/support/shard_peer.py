"""A process that sends expert shards as a worker does (FetchShard through the worker's own
serving code, shard_serve.shard_chunks), without the rest of a worker: for tests that
kill a sender mid-transfer and for bench/shard_transfer.py. Prints its port, then serves
until killed.

    python -m tests.support.shard_peer MODEL DATA_DIR [--delay-s S]
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from meshllm.common import convert_shards
from meshllm.common.models import describe
from meshllm.common.types import ModelSpec
from meshllm.v1 import worker_pb2, worker_pb2_grpc
from meshllm.worker.shard_serve import shard_chunks


class ShardPeer(worker_pb2_grpc.ShardWorkerServicer):
    def __init__(self, spec: ModelSpec, data_dir: Path, delay_s: float) -> None:
        self._spec, self._data_dir, self._delay_s = spec, data_dir, delay_s

    async def FetchShard(self, request: worker_pb2.FetchShardRequest,
                         context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[worker_pb2.ShardChunk]:
        chunks = shard_chunks(self._spec, convert_shards.shard_request_from_pb(request),
                              self._data_dir)
        async for chunk in chunks:
            yield convert_shards.shard_chunk_to_pb(chunk)
            await asyncio.sleep(self._delay_s)  # a slow link: time to kill it mid-transfer


async def serve(model: Path, data_dir: Path, delay_s: float) -> None:
    server = grpc.aio.server()
    worker_pb2_grpc.add_ShardWorkerServicer_to_server(
        ShardPeer(describe(str(model), 512), data_dir, delay_s), server)
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--delay-s", type=float, default=0.0)
    args = parser.parse_args()
    asyncio.run(serve(args.model, args.data_dir, args.delay_s))


if __name__ == "__main__":
    main()
