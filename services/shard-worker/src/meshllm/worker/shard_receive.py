"""Receiving an expert shard from a peer (ShardWorker.FetchShard), for a worker that lacks
the model file.

The chunks go to a temporary file beside the shard's cache path, hashed as they come; the
file is renamed into the cache only when its size and sha256 match what the sender
announced, so a transfer cut short or corrupted never leaves a shard that would load. A
peer that fails (it died, it does not have the shard after all, the bytes were wrong)
hands over to the next one; when none is left the load fails with ShardTransferFailed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import grpc
from meshllm.common import convert_shards, grpc_errors
from meshllm.common.errors import InvalidRecord, ModelSourceError
from meshllm.common.shard_transfer import ShardChunk, ShardRequest
from meshllm.common.tls import PLAINTEXT, GrpcSecurity
from meshllm.v1 import worker_pb2_grpc
from meshllm.worker.shard_source import PeerHolding
from meshllm.worker.shards import ShardFile, temporary_for

log = logging.getLogger(__name__)

# A peer cutting the shard sends an empty message every second; this long without any
# message means it is gone (a machine that vanished sends no reset).
IDLE_TIMEOUT_S = 60.0
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 8 << 20)]


class ShardTransferFailed(ModelSourceError):
    """No peer could send the shard; the message says what was tried and what to do."""

    reason = "shard_transfer_failed"


class CorruptShardTransfer(ShardTransferFailed):
    """The bytes received are not the file the sender announced (size or sha256)."""

    reason = "shard_transfer_corrupt"


class ShardWriter:
    """One transfer's chunks into a temporary file, renamed to `path` once verified.
    Blocking file I/O: call it from a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received = 0
        self.total = 0
        self._temporary = temporary_for(path)
        self._hash = hashlib.sha256()
        self._file: BinaryIO | None = None
        self.done = False
        self.first_data_at = 0.0  # time.monotonic() of the first data (the peer had cut it)

    @property
    def fraction(self) -> float:
        return self.received / self.total if self.total else 0.0

    def accept(self, chunk: ShardChunk) -> bool:
        """Takes one message; True once the file is verified and in place."""
        if self.done:
            raise CorruptShardTransfer(f"{self.path.name}: a message after the last one")
        if chunk.sha256:
            self._finish(chunk.sha256)
            return True
        if chunk.data:
            self._write(chunk)
        return False

    def _write(self, chunk: ShardChunk) -> None:
        if self._file is None:
            if chunk.total_bytes <= 0:
                raise CorruptShardTransfer(f"{self.path.name}: data before the file's size")
            self.total = chunk.total_bytes
            self.first_data_at = time.monotonic()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self._temporary.open("wb")
        elif chunk.total_bytes not in (0, self.total):
            raise CorruptShardTransfer(f"{self.path.name}: the announced size changed")
        if self.received + len(chunk.data) > self.total:
            raise CorruptShardTransfer(
                f"{self.path.name}: more than the {self.total} bytes announced")
        self._file.write(chunk.data)
        self._hash.update(chunk.data)
        self.received += len(chunk.data)

    def _finish(self, announced: str) -> None:
        if self._file is None or self.received != self.total:
            raise CorruptShardTransfer(
                f"{self.path.name}: {self.received} of {self.total} bytes before the end")
        if self._hash.hexdigest() != announced:
            raise CorruptShardTransfer(
                f"{self.path.name}: sha256 {self._hash.hexdigest()[:12]} received, "
                f"{announced[:12]} announced")
        self._file.close()
        os.replace(self._temporary, self.path)
        self.done = True

    def discard(self) -> None:
        """Removes the temporary file unless it became the shard (always safe to call)."""
        if self._file is not None:
            self._file.close()
        self._temporary.unlink(missing_ok=True)


def _failure(peer: PeerHolding, exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        typed = grpc_errors.error_from_rpc(exc)
        return f"{peer.worker_id}: {typed or exc.code().name + ' ' + (exc.details() or '')}"
    if isinstance(exc, TimeoutError):
        return f"{peer.worker_id}: nothing received for {IDLE_TIMEOUT_S:.0f} s"
    return f"{peer.worker_id}: {exc}"


async def receive_from(peer: PeerHolding, request: ShardRequest, path: Path,
                       progress: Callable[[float], None],
                       security: GrpcSecurity = PLAINTEXT) -> ShardWriter:
    """The shard from one peer into `path`, verified. Raises what went wrong."""
    writer = ShardWriter(path)
    channel = security.channel(peer.address, options=CHANNEL_OPTIONS)
    try:
        call = worker_pb2_grpc.ShardWorkerStub(channel).FetchShard(
            convert_shards.shard_request_to_pb(request))
        stream = aiter(call)
        while True:
            async with asyncio.timeout(IDLE_TIMEOUT_S):
                message = await anext(stream, None)
            if message is None:
                raise ShardTransferFailed(f"the stream ended after {writer.received} of "
                                          f"{writer.total} bytes, without its sha256")
            if await asyncio.to_thread(writer.accept, convert_shards.shard_chunk_from_pb(
                    message)):
                return writer
            progress(writer.fraction)
    finally:
        await asyncio.to_thread(writer.discard)
        await channel.close()


async def fetch_shard(peers: Sequence[PeerHolding], request: ShardRequest, path: Path,
                      progress: Callable[[float], None],
                      security: GrpcSecurity = PLAINTEXT) -> ShardFile:
    """The shard from the first peer that sends it whole; ShardTransferFailed when none."""
    failures = []
    for peer in peers:
        started = time.monotonic()
        try:
            writer = await receive_from(peer, request, path, progress, security)
        except (grpc.aio.AioRpcError, ShardTransferFailed, InvalidRecord, TimeoutError,
                OSError) as exc:
            failures.append(_failure(peer, exc))
            log.warning("receiving the expert shard %s from %s failed: %s", path.name,
                        peer.worker_id, failures[-1])
            continue
        now = time.monotonic()
        sending_s = now - writer.first_data_at
        log.info("expert shard of %s received from %s in %.2fs (%.2fs waiting for the peer to "
                 "cut it): %s, %.1f MB, %.1f MB/s", request.model_id, peer.worker_id,
                 now - started, writer.first_data_at - started, path, writer.total / 1e6,
                 writer.total / 1e6 / max(sending_s, 1e-6))
        return ShardFile(path, True, now - started, writer.total, received=True)
    raise ShardTransferFailed(
        f"no peer could send the expert shard {path.name} of {request.model_id} "
        f"({'; '.join(failures) or 'no peer to ask'}): make the model file readable on this "
        f"worker, or check the logs of the workers named")
