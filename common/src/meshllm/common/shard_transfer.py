"""An expert shard sent from one worker to another (ShardWorker.FetchShard): what the
receiving worker asks for and the pieces of the file that come back.

A worker that lacks a mixture-of-experts model's file cannot cut its shard itself; a peer
that can read the file (or has that shard cached) streams it. Only `convert_shards` knows
the protobuf messages these map to.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshllm.common.moe import ExpertSelection
from meshllm.common.types import ModelId

CHUNK_BYTES = 1 << 20  # a shard travels in pieces of 1 MiB: memory stays bounded both sides


@dataclass(frozen=True)
class ShardRequest:
    model_id: ModelId
    model_digest: str          # sha256 (hex) of the model file the shard is cut from
    experts: ExpertSelection   # the shard's experts per MoE layer
    from_worker_id: str = ""   # who asks, for the serving worker's log


@dataclass(frozen=True)
class ShardChunk:
    """One message of the stream. None of the fields set: the serving worker is still
    cutting the shard (keeps the stream alive). `total_bytes` comes with the first data;
    `sha256` alone in the last message, over every byte sent."""

    data: bytes = b""
    total_bytes: int = 0
    sha256: str = ""


def is_digest(text: str) -> bool:
    """A sha256 in lower-case hex, as `moe.model_digest` writes it."""
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)
