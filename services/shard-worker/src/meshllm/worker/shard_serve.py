"""Sending an expert shard to a peer that lacks the model file (ShardWorker.FetchShard).

The shard comes from this worker's cache, or is cut into it first from this worker's own
copy of the model file (so the next peer asking gets it at once). It is read 1 MiB at a
time and hashed as it goes: memory stays flat whatever the shard's size, and the closing
message gives the sha256 the receiver checks before it keeps the file.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from meshllm.common import models
from meshllm.common.errors import ModelNotFound, ModelSourceError
from meshllm.common.moe import model_digest
from meshllm.common.shard_transfer import CHUNK_BYTES, ShardChunk, ShardRequest
from meshllm.common.types import ModelSpec
from meshllm.worker.shards import ensure_shard, shard_path

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # an empty message this often while the shard is cut: the stream lives


class ShardNotHeld(ModelNotFound):
    """This worker has neither the shard nor the model file it is cut from."""

    reason = "shard_not_held"


def readable_source(spec: ModelSpec) -> Path | None:
    """This worker's copy of the model file, when it has one with the planner's sha256."""
    try:
        path = models.materialize(spec.source)
        return path if model_digest(path) == spec.model_digest else None
    except (ModelSourceError, OSError):
        return None


async def _cut(spec: ModelSpec, request: ShardRequest, data_dir: Path
               ) -> AsyncIterator[ShardChunk | Path]:
    """Empty chunks while the shard is cut, then its path."""
    source = await asyncio.to_thread(readable_source, spec)
    if source is None:
        raise ShardNotHeld(f"worker has neither the shard nor the file of {spec.model_id} "
                           f"(sha256 {spec.model_digest[:12]})")
    log.info("cutting an expert shard of %s for %s", spec.model_id,
             request.from_worker_id or "a peer")
    cut = asyncio.ensure_future(asyncio.to_thread(
        ensure_shard, source, data_dir, request.experts, spec.model_digest))
    while not (await asyncio.wait({cut}, timeout=HEARTBEAT_S))[0]:
        yield ShardChunk()
    yield cut.result().path


def _read(file: BinaryIO) -> bytes:
    return file.read(CHUNK_BYTES)


async def _file_chunks(path: Path) -> AsyncIterator[ShardChunk]:
    digest = hashlib.sha256()
    file = await asyncio.to_thread(path.open, "rb")
    try:
        total = path.stat().st_size
        sent = 0
        while data := await asyncio.to_thread(_read, file):
            digest.update(data)
            yield ShardChunk(data, total if sent == 0 else 0)
            sent += len(data)
    finally:
        file.close()
    yield ShardChunk(sha256=digest.hexdigest())


async def shard_chunks(spec: ModelSpec | None, request: ShardRequest, data_dir: Path
                       ) -> AsyncIterator[ShardChunk]:
    """The messages that carry the shard `request` asks for; ShardNotHeld when this worker
    cannot make it (another model, another file, no file here)."""
    if spec is None or spec.model_digest != request.model_digest:
        raise ShardNotHeld(f"this worker knows no model {request.model_id} with sha256 "
                           f"{request.model_digest[:12]}")
    path = shard_path(data_dir, request.model_digest, request.experts)
    if not path.is_file():
        async for step in _cut(spec, request, data_dir):
            if isinstance(step, Path):
                path = step
            else:
                yield step
    log.info("sending the expert shard %s of %s to %s", path.name, spec.model_id,
             request.from_worker_id or "a peer")
    async for chunk in _file_chunks(path):
        yield chunk
