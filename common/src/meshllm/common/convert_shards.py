"""Protobuf conversion of an expert shard's transfer between workers (FetchShard).

Part of `convert`, kept apart for size; like it, parsing validates and raises
InvalidRecord: a request or a chunk from a peer is untrusted until it passes here.
"""

from __future__ import annotations

from meshllm.common import convert_moe
from meshllm.common.errors import InvalidRecord
from meshllm.common.shard_transfer import ShardChunk, ShardRequest, is_digest
from meshllm.common.types import ModelId
from meshllm.v1 import worker_pb2


def shard_request_to_pb(r: ShardRequest) -> worker_pb2.FetchShardRequest:
    return worker_pb2.FetchShardRequest(
        model_id=r.model_id, model_digest=r.model_digest,
        experts=convert_moe.selection_to_pb(r.experts), from_worker_id=r.from_worker_id)


def shard_request_from_pb(m: worker_pb2.FetchShardRequest) -> ShardRequest:
    if not m.model_id:
        raise InvalidRecord("shard request without model_id")
    if not is_digest(m.model_digest):
        raise InvalidRecord(f"shard request for {m.model_id}: bad model_digest "
                            f"{m.model_digest[:80]!r}")
    experts = convert_moe.selection_from_pb(m.model_id, m.experts)
    if not experts:
        raise InvalidRecord(f"shard request for {m.model_id}: no experts")
    return ShardRequest(ModelId(m.model_id), m.model_digest, experts, m.from_worker_id)


def shard_chunk_to_pb(c: ShardChunk) -> worker_pb2.ShardChunk:
    return worker_pb2.ShardChunk(data=c.data, total_bytes=c.total_bytes, sha256=c.sha256)


def shard_chunk_from_pb(m: worker_pb2.ShardChunk) -> ShardChunk:
    if m.sha256 and (m.data or not is_digest(m.sha256)):
        raise InvalidRecord(f"shard chunk: bad closing message (sha256 {m.sha256[:80]!r}, "
                            f"{len(m.data)} bytes of data)")
    return ShardChunk(m.data, m.total_bytes, m.sha256)
