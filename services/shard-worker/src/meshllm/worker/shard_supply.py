"""Getting the expert shard a plan holds onto this worker's disk: from its cache, cut from
the model file it can read, or received from a peer when it has no file (shard_source
decides which; this module does it)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from meshllm.common import models
from meshllm.common.errors import ModelSourceError
from meshllm.common.moe import ExpertSelection
from meshllm.common.shard_transfer import ShardRequest
from meshllm.common.tls import PLAINTEXT, GrpcSecurity
from meshllm.common.types import ModelSpec
from meshllm.worker.shard_receive import ShardTransferFailed, fetch_shard
from meshllm.worker.shard_source import PeerHolding, ShardSourcing, SourceKind, choose_source
from meshllm.worker.shards import ShardFile, ensure_shard, shard_name, shard_path

log = logging.getLogger(__name__)

CUTTING = "building expert shard"
RECEIVING = "receiving expert shard"
WAITING = "waiting for a peer with the model file"
PEER_WAIT_S = 30.0  # a peer that has the file may not have said so yet (it just started)

Progress = Callable[[str, float], None]  # (phase, fraction); called from any thread
Peers = Callable[[str, str], list[PeerHolding]]  # (model sha256, shard name) -> holders


@dataclass(frozen=True)
class ShardSupply:
    """What a host needs to get its shard: where shards live and who else holds them."""

    data_dir: Path
    worker_id: str = ""
    peers: Peers = lambda digest, name: []
    security: GrpcSecurity = PLAINTEXT
    peer_wait_s: float = PEER_WAIT_S


def _local_file(spec: ModelSpec) -> Path | None:
    try:
        return models.materialize(spec.source)
    except ModelSourceError:
        return None


async def _sourcing(spec: ModelSpec, experts: ExpertSelection, supply: ShardSupply,
                    local: Path | None, progress: Progress) -> ShardSourcing:
    """The choice, waited for a while when nothing holds the shard yet."""
    cached = shard_path(supply.data_dir, spec.model_digest, experts)
    name = shard_name(spec.model_digest, experts)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + supply.peer_wait_s
    while True:
        sourcing = choose_source(cached.is_file(), local is not None,
                                 supply.peers(spec.model_digest, name), spec.model_id)
        if sourcing.kind is not SourceKind.NONE or loop.time() >= deadline:
            return sourcing
        progress(WAITING, 0.0)
        await asyncio.sleep(1.0)


async def obtain_shard(spec: ModelSpec, experts: ExpertSelection, supply: ShardSupply,
                       progress: Progress) -> ShardFile:
    """The shard's file on this worker's disk (blocking work runs in threads)."""
    local = await asyncio.to_thread(_local_file, spec)
    sourcing = await _sourcing(spec, experts, supply, local, progress)
    path = shard_path(supply.data_dir, spec.model_digest, experts)
    if sourcing.kind is SourceKind.CACHED:
        return ShardFile(path, False, 0.0, path.stat().st_size)
    if sourcing.kind is SourceKind.CUT:
        assert local is not None
        progress(CUTTING, 0.0)
        return await asyncio.to_thread(ensure_shard, local, supply.data_dir, experts,
                                       spec.model_digest, lambda f: progress(CUTTING, f))
    if sourcing.kind is SourceKind.NONE:
        raise ShardTransferFailed(sourcing.why)
    log.info("%s: no model file here (%s); receiving expert shard %s from %s", spec.model_id,
             spec.source, path.name, ", ".join(p.worker_id for p in sourcing.peers))
    progress(RECEIVING, 0.0)
    request = ShardRequest(spec.model_id, spec.model_digest, experts, supply.worker_id)
    return await fetch_shard(sourcing.peers, request, path, lambda f: progress(RECEIVING, f),
                             supply.security)
