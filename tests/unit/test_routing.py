"""Table-driven tests of request routing and the 503 explanation."""

from __future__ import annotations

import pytest
from meshllm.common.meshview import MeshSnapshot
from meshllm.common.types import (
    Assignment,
    LoadState,
    ModelId,
    ModelSpec,
    ModelState,
    Placement,
    Replica,
    WorkerId,
    WorkerInfo,
    whole,
)
from meshllm.gateway.routing import (
    ready_replicas,
    serves_embeddings,
    why_unavailable,
)

M = ModelId("m")


def worker(name: str, state: LoadState | None = LoadState.READY) -> WorkerInfo:
    models = (ModelState(M, state),) if state else ()
    return WorkerInfo(WorkerId(name), "127.0.0.1:1", "cpu", 1, 1, 0.0, models)


def snapshot(workers: list[WorkerInfo], placed: list[str], reason: str = "") -> MeshSnapshot:
    spec = ModelSpec(M, "m", 1, 1, 1, 1, "x", 1)
    placement = Placement(M, tuple(whole(WorkerId(w), 1) for w in placed), 1, reason)
    return MeshSnapshot({w.worker_id: w for w in workers}, {M: spec}, {M: placement})


@pytest.mark.parametrize(("workers", "placed", "expected"), [
    ([worker("a"), worker("b")], ["a", "b"], ["a", "b"]),
    ([worker("a"), worker("b", LoadState.LOADING)], ["a", "b"], ["a"]),
    ([worker("a"), worker("b", LoadState.FAILED)], ["a", "b"], ["a"]),
    ([worker("a")], ["a", "gone"], ["a"]),
    ([worker("a"), worker("b")], ["b"], ["b"]),
    ([worker("a", None)], ["a"], []),
], ids=["both ready", "loading skipped", "failed skipped", "vanished worker", "unplaced worker",
        "not reporting"])
def test_ready_replicas(workers: list[WorkerInfo], placed: list[str], expected: list[str]) -> None:
    assert [w.worker_id for w in ready_replicas(snapshot(workers, placed), M)] == expected


def test_why_unavailable_explains_each_case() -> None:
    assert "has not been placed" in why_unavailable(MeshSnapshot(), M)
    assert "cannot be served: too big" in why_unavailable(snapshot([], [], "too big"), M)
    loading = why_unavailable(snapshot([worker("a", LoadState.LOADING)], ["a"]), M)
    assert "a: loading" in loading


SPLIT = Replica((Assignment(WorkerId("s1"), 0, 1), Assignment(WorkerId("s2"), 1, 2)))


def mixed(replicas: tuple[Replica, ...], force_split: bool = False,
          placed: bool = True) -> MeshSnapshot:
    spec = ModelSpec(M, "m", 1, 2, 1, 1, "x", 1, force_split=force_split)
    workers = [worker(w) for w in ("a", "s1", "s2")]
    placements = {M: Placement(M, replicas, 1)} if placed else {}
    return MeshSnapshot({w.worker_id: w for w in workers}, {M: spec}, placements)


@pytest.mark.parametrize(("snap", "heads", "whole_heads", "embeds"), [
    (mixed((whole(WorkerId("a"), 2),)), ["a"], ["a"], True),
    (mixed((SPLIT, whole(WorkerId("a"), 2))), ["s1", "a"], ["a"], True),
    (mixed((SPLIT,)), ["s1"], [], False),
    (mixed((), placed=False), [], [], True),
    (mixed((), force_split=True, placed=False), [], [], False),
], ids=["whole", "split and whole", "split only", "not placed yet", "to be split"])
def test_only_whole_replicas_serve_embeddings(snap: MeshSnapshot, heads: list[str],
                                              whole_heads: list[str], embeds: bool) -> None:
    assert [w.worker_id for w in ready_replicas(snap, M)] == heads
    assert [w.worker_id for w in ready_replicas(snap, M, whole_only=True)] == whole_heads
    assert serves_embeddings(snap, M) is embeds
