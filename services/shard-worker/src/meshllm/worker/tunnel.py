"""ggml RPC bytes carried inside a gRPC stream between workers.

The ggml RPC server has no authentication and listens on loopback only. A head's engine
connects to a local `TunnelListener` port; each connection becomes a `Tunnel` stream to the
stage worker, which feeds the bytes to its loopback RPC server (`pump_to_stage`). The
stream uses the mesh's gRPC channel, and with it the mesh's credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
from meshllm.common.tls import PLAINTEXT, GrpcSecurity
from meshllm.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # tensors go through in pieces of at most 1 MiB
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 8 << 20),
                   ("grpc.max_send_message_length", 8 << 20)]


async def _socket_frames(reader: asyncio.StreamReader, first: worker_pb2.TunnelFrame | None
                         ) -> AsyncIterator[worker_pb2.TunnelFrame]:
    if first is not None:
        yield first
    while data := await reader.read(CHUNK_BYTES):
        yield worker_pb2.TunnelFrame(data=data)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


class TunnelListener:
    """Head side: a loopback port whose connections are tunnelled to one stage."""

    def __init__(self, stage_address: str, model_id: str,
                 security: GrpcSecurity = PLAINTEXT) -> None:
        self._stage_address = stage_address
        self._model_id = model_id
        self._channel = security.channel(stage_address, options=CHANNEL_OPTIONS)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        stub = worker_pb2_grpc.ShardWorkerStub(self._channel)
        opening = worker_pb2.TunnelFrame(model_id=self._model_id)
        call = stub.Tunnel(_socket_frames(reader, opening))
        try:
            async for frame in call:
                writer.write(frame.data)
                await writer.drain()
        except grpc.aio.AioRpcError as exc:
            # Closing the socket makes llama.cpp see the stage as gone, as with a direct
            # connection; it aborts and the worker restarts its engine.
            log.warning("tunnel to %s for %s broke: %s", self._stage_address, self._model_id,
                        exc.code().name)
        except asyncio.CancelledError:
            # close() ends the connection. This task is asyncio's own, awaited by nobody,
            # and Python 3.11's stream callback logs one that ends cancelled as an error.
            pass
        finally:
            call.cancel()
            await _close(writer)
            self._connections.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await self._channel.close()


async def pump_to_stage(frames: AsyncIterator[worker_pb2.TunnelFrame], rpc_port: int
                        ) -> AsyncIterator[worker_pb2.TunnelFrame]:
    """Stage side: bytes from the stream to the loopback RPC server and back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", rpc_port)

    async def upstream() -> None:
        async for frame in frames:
            if frame.data:
                writer.write(frame.data)
                await writer.drain()
        writer.write_eof()

    sending = asyncio.create_task(upstream())
    try:
        while data := await reader.read(CHUNK_BYTES):
            yield worker_pb2.TunnelFrame(data=data)
    finally:
        sending.cancel()
        await _close(writer)
