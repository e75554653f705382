"""Where a worker gets its expert shard (shard_source, pure): table tests of the choice
between its cache, a local cut and the peers that hold the file or the shard, and of which
peers a mesh snapshot offers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from meshllm.common.types import WorkerId, WorkerInfo
from meshllm.worker.shard_source import (
    PeerHolding,
    SourceKind,
    choose_source,
    peer_holdings,
)


def peer(name: str, shard: bool = False, file: bool = False,
         rtt: float | None = None) -> PeerHolding:
    return PeerHolding(WorkerId(name), f"{name}:1", shard, file, rtt)


@dataclass(frozen=True)
class Case:
    why: str
    cached: bool
    has_file: bool
    peers: tuple[PeerHolding, ...]
    kind: SourceKind
    order: tuple[str, ...] = ()


CASES = [
    Case("the cache first, even with the file here", True, True, (peer("a", file=True),),
         SourceKind.CACHED),
    Case("the cache first, without the file", True, False, (), SourceKind.CACHED),
    Case("a file here is cut here, never fetched", False, True,
         (peer("a", shard=True, rtt=0.1),), SourceKind.CUT),
    Case("no file, no peer", False, False, (), SourceKind.NONE),
    Case("a peer holding neither is no source", False, False, (peer("a"),), SourceKind.NONE),
    Case("no file: the peer with the file", False, False, (peer("a", file=True),),
         SourceKind.FETCH, ("a",)),
    Case("a cached shard before a cut, however far", False, False,
         (peer("near", file=True, rtt=0.1), peer("far", shard=True, rtt=50.0)),
         SourceKind.FETCH, ("far", "near")),
    Case("at equal holdings, the nearest first", False, False,
         (peer("b", file=True, rtt=9.0), peer("a", file=True, rtt=2.0),
          peer("c", file=True, rtt=5.0)), SourceKind.FETCH, ("a", "c", "b")),
    Case("unmeasured peers after measured ones, then by id", False, False,
         (peer("z", file=True), peer("y", file=True), peer("x", file=True, rtt=30.0)),
         SourceKind.FETCH, ("x", "y", "z")),
    Case("holders only, in order", False, False,
         (peer("none"), peer("both", shard=True, file=True, rtt=3.0),
          peer("file", file=True, rtt=1.0)), SourceKind.FETCH, ("both", "file")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.why for c in CASES])
def test_where_a_shard_comes_from(case: Case) -> None:
    sourcing = choose_source(case.cached, case.has_file, case.peers, "moe")
    assert sourcing.kind is case.kind
    assert tuple(p.worker_id for p in sourcing.peers) == case.order
    if case.kind is SourceKind.NONE:
        assert "moe" in sourcing.why and "put the model file" in sourcing.why


def worker(name: str, files: tuple[str, ...] = (), shards: tuple[str, ...] = ()) -> WorkerInfo:
    return WorkerInfo(WorkerId(name), f"127.0.0.1:{len(name)}", "cpu", 1, 1, 0.0,
                      model_files=files, expert_shards=shards)


def test_peers_are_those_advertising_the_file_or_the_shard() -> None:
    digest, other = "d" * 64, "e" * 64
    workers = {w.worker_id: w for w in (
        worker("me", files=(digest,)), worker("filer", files=(digest,)),
        worker("cacher", shards=("dddd-1",)), worker("stranger", files=(other,),
                                                     shards=("dddd-2",)))}
    held = peer_holdings(workers, WorkerId("me"), digest, "dddd-1", {"filer": 4.0})
    assert sorted(held, key=lambda p: p.worker_id) == [
        PeerHolding(WorkerId("cacher"), "127.0.0.1:6", True, False, None),
        PeerHolding(WorkerId("filer"), "127.0.0.1:5", False, True, 4.0),
    ]
