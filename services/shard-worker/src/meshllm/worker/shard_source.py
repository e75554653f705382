"""Where a worker gets an expert shard it is planned (pure): its own cache, a cut from the
model file it can read, or a peer that holds the file or the shard.

A worker never receives a shard over the mesh while it can read the file: cutting reads
local bytes, a transfer spends the link and a peer's time. A worker lacking the file asks
the peers that have the shard cached first (they only read it back), then those that can
read the file (they cut it first), nearest first by this worker's measured round trips.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshllm.common.types import WorkerId, WorkerInfo


class SourceKind(enum.Enum):
    CACHED = "cached"   # in this worker's shard cache already
    CUT = "cut"         # cut here from the model file this worker can read
    FETCH = "fetch"     # received from a peer, trying `peers` in order
    NONE = "none"       # nowhere: no file here, no peer with the file or the shard


@dataclass(frozen=True)
class PeerHolding:
    """What one peer can send of one shard."""

    worker_id: WorkerId
    address: str        # its ShardWorker gRPC address
    has_shard: bool     # the shard is in its cache
    has_file: bool      # it can read the model file (with the planner's sha256)
    rtt_ms: float | None = None  # this worker's measured round trip to it


@dataclass(frozen=True)
class ShardSourcing:
    kind: SourceKind
    peers: tuple[PeerHolding, ...] = ()  # FETCH: who to ask, in order
    why: str = ""                        # NONE: what is missing and what to do


def peer_holdings(workers: Mapping[WorkerId, WorkerInfo], me: WorkerId, model_digest: str,
                  shard: str, rtt_ms: Mapping[str, float]) -> list[PeerHolding]:
    """Every other live worker that advertises the shard or the model file."""
    held = []
    for worker in workers.values():
        has_shard = shard in worker.expert_shards
        has_file = model_digest in worker.model_files
        if worker.worker_id != me and (has_shard or has_file):
            held.append(PeerHolding(worker.worker_id, worker.address, has_shard, has_file,
                                    rtt_ms.get(worker.worker_id)))
    return held


def _preference(peer: PeerHolding) -> tuple[bool, bool, float, str]:
    # A cached shard costs the peer a read, a cut costs it the whole file; then the nearest
    # (unmeasured last), then by id, so the order is the same on every call.
    unmeasured = peer.rtt_ms is None
    return (not peer.has_shard, unmeasured, peer.rtt_ms or 0.0, peer.worker_id)


def choose_source(cached: bool, has_file: bool, peers: Sequence[PeerHolding],
                  model: str = "the model") -> ShardSourcing:
    """Where to get the shard: the cache, a local cut, else peers in order of preference."""
    if cached:
        return ShardSourcing(SourceKind.CACHED)
    if has_file:
        return ShardSourcing(SourceKind.CUT)
    usable = [p for p in peers if p.has_shard or p.has_file]
    if not usable:
        return ShardSourcing(SourceKind.NONE, why=(
            f"this worker cannot read the file of {model} and no other worker advertises "
            f"the file or this shard: put the model file where the planner's source path "
            f"says on this worker or on a peer (or share the data directory of a worker "
            f"that has the shard)"))
    return ShardSourcing(SourceKind.FETCH, tuple(sorted(usable, key=_preference)))
