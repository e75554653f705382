"""Table-driven tests of expert shards whose live shards no longer hold every expert (dealt
again over the workers left, or kept and explained), and of expert shards no worker could
build (planner/experts_redeal.py, inside place() and a planning round)."""

from __future__ import annotations

import dataclasses

import pytest
from meshllm.common.moe import ExpertSelection
from meshllm.common.types import (
    ModelDeclaration,
    ModelId,
    Placement,
    Replica,
    WorkerId,
    WorkerInfo,
    whole,
)
from meshllm.planner.assign import RoundInputs, RoundPolicy, next_placements
from meshllm.planner.experts import coverage
from meshllm.planner.experts_redeal import (
    HOLES,
    describe_missing,
    keep_held,
    missing_experts,
    unreadable,
)
from meshllm.planner.place import PlacementPolicy, place

from tests.unit.test_experts_deal import LAYERS, LAYOUT, POLICY, SKEWED, SPEC, E, budget, worker

ROUND = RoundPolicy(PlacementPolicy(engine_overhead_bytes=0))
DECLARED = {SPEC.model_id: ModelDeclaration(SPEC.model_id, SPEC.source)}


def _layers(*experts: int) -> ExpertSelection:
    return (tuple(experts),) * LAYERS


MISSING = [
    # (description, selections, missing per layer, in words)
    ("every expert held", [_layers(0, 1, 2, 3), _layers(4, 5, 6, 7)], ((),) * LAYERS, ""),
    ("the same experts missing in every layer", [_layers(0, 1, 3, 5, 7)],
     _layers(2, 4, 6), "experts 2,4,6 of layers 0-3"),
    ("one layer short of one expert",
     [((0, 1, 2, 3), (0, 1, 2, 3), (0, 1, 2, 3), (0, 1, 2)), _layers(4, 5, 6, 7)],
     ((), (), (), (3,)), "expert 3 of layer 3"),
    ("runs of layers with other experts missing",
     [((0, 1, 2, 3, 4, 5), (0, 1, 2, 3, 4, 5), (1, 2, 3, 4, 5, 6, 7), (0, 1, 2, 3, 4, 5, 6))],
     ((6, 7), (6, 7), (0,), (7,)), "experts 6-7 of layers 0-1; expert 0 of layer 2; "
                                  "expert 7 of layer 3"),
    ("no shard at all: everything missing", [], _layers(*range(E)),
     "experts 0-7 of layers 0-3"),
]


@pytest.mark.parametrize(("selections", "missing", "words"), [c[1:] for c in MISSING],
                         ids=[c[0] for c in MISSING])
def test_missing_experts_in_plain_words(selections: list[ExpertSelection],
                                        missing: ExpertSelection, words: str) -> None:
    assert missing_experts(LAYOUT, selections) == missing
    assert describe_missing(missing) == words


def test_a_long_list_of_missing_experts_is_cut_short() -> None:
    many = tuple(tuple(range(0, 64, 2)) if layer % 2 else () for layer in range(12))
    words = describe_missing(many)
    assert words.startswith("32 experts (0,2,4,") and words.endswith("; and 2 more runs of "
                                                                      "layers")


def _shard(name: str, *experts: int) -> Replica:
    return Replica(whole(WorkerId(name), LAYERS).stages, experts=_layers(*experts))


KEEPS = [
    # (description, new deal, held before, selections after by worker)
    ("a worker whose shard is in the new deal keeps it",
     [_shard("a", 0, 2, 4, 6), _shard("b", 1, 3, 5, 7)], {"a": _layers(1, 3, 5, 7)},
     {"a": _layers(1, 3, 5, 7), "b": _layers(0, 2, 4, 6)}),
    ("none held is in the new deal: as dealt",
     [_shard("a", 0, 2, 4, 6), _shard("b", 1, 3, 5, 7)], {"a": _layers(0, 1, 2, 3)},
     {"a": _layers(0, 2, 4, 6), "b": _layers(1, 3, 5, 7)}),
    ("only between shards of one size: the memory each takes stays",
     [_shard("a", 0, 1, 2, 3, 4), _shard("b", 5, 6, 7)], {"b": _layers(0, 1, 2, 3, 4)},
     {"a": _layers(0, 1, 2, 3, 4), "b": _layers(5, 6, 7)}),
]


@pytest.mark.parametrize(("dealt", "held", "after"), [c[1:] for c in KEEPS],
                         ids=[c[0] for c in KEEPS])
def test_keep_held(dealt: list[Replica], held: dict[str, ExpertSelection],
                   after: dict[str, ExpertSelection]) -> None:
    kept = keep_held(dealt, {WorkerId(w): s for w, s in held.items()})
    assert {r.head.worker_id: r.experts for r in kept} == after
    assert sorted(r.experts for r in kept) == sorted(r.experts for r in dealt)


def _workers(sizes: dict[str, int], reads: bool = True) -> dict[WorkerId, WorkerInfo]:
    return {WorkerId(w): worker(w, budget(k), reads) for w, k in sizes.items()}


def _round(workers: dict[WorkerId, WorkerInfo], published: dict[ModelId, Placement],
           **changes: object) -> Placement:
    inputs = RoundInputs({SPEC.model_id: SPEC}, DECLARED, workers, published, {}, 0.0)
    return next_placements(dataclasses.replace(inputs, **changes),  # type: ignore[arg-type]
                           ROUND).placements[SPEC.model_id]


def _experts(placement: Placement) -> dict[str, ExpertSelection]:
    return {r.head.worker_id: r.experts for r in placement.replicas}


DEATHS = [
    # (description, budgets in experts, workers that die, what follows)
    ("three shards of six, one dies: every expert still held, nothing moves",
     {"a": 6, "b": 6, "c": 6}, ["a"], "kept"),
    ("four shards of four, two holding the same experts die: dealt again over two",
     {"a": 4, "b": 4, "c": 4, "d": 4}, ["a", "b"], "dealt again"),
    ("four shards of four, two holding other experts die: every expert still held",
     {"a": 4, "b": 4, "c": 4, "d": 4}, ["a", "c"], "kept"),
    ("two shards of five, one dies: one worker cannot hold every expert",
     {"a": 5, "b": 5}, ["a"], "holes"),
    ("three shards of six, two die: one worker cannot hold every expert",
     {"a": 6, "b": 6, "c": 6}, ["a", "b"], "holes"),
]


@pytest.mark.parametrize(("sizes", "dead", "follows"), [c[1:] for c in DEATHS],
                         ids=[c[0] for c in DEATHS])
def test_a_shard_that_dies(sizes: dict[str, int], dead: list[str], follows: str) -> None:
    workers = _workers(sizes)
    first = _round(workers, {})
    before = first.replicas
    left = {w: info for w, info in workers.items() if w not in dead}
    after = _round(left, {SPEC.model_id: first})
    survivors = [r for r in before if r.head.worker_id not in dead]
    deal = after.expert_deal
    assert deal is not None and not after.unplaced_reason
    if follows == "kept":
        assert after.replicas == tuple(survivors) and deal == first.expert_deal
    elif follows == "dealt again":
        assert coverage([r.experts for r in after.replicas], E) >= 1
        assert sorted(after.head_ids) == sorted(left)
        assert deal.why.startswith("dealt again over 2 workers: experts ")
        assert "were on no live shard" in deal.why
        changed = [r for r in after.replicas if r not in survivors]
        assert len(changed) == 1  # the one that kept its experts does not reload
    else:
        assert after.replicas == tuple(survivors)
        missing = describe_missing(missing_experts(LAYOUT, [r.experts for r in survivors]))
        assert deal.why.startswith(f"{HOLES}{missing} on no live shard")
        assert "expert shards need two workers" in deal.why and "MiB free gets" in deal.why
    again = _round(left, {SPEC.model_id: after})
    assert again == after  # settled: the next round changes nothing


def test_a_worker_that_joins_fills_the_holes_without_a_re_deal() -> None:
    workers = _workers({"a": 5, "b": 5})
    first = _round(workers, {})
    holed = _round({WorkerId("b"): workers[WorkerId("b")]}, {SPEC.model_id: first})
    assert holed.expert_deal is not None and holed.expert_deal.why.startswith(HOLES)
    joined = {WorkerId("b"): workers[WorkerId("b")], **_workers({"c": 3})}
    grown = _round(joined, {SPEC.model_id: holed})
    assert grown.replicas[0] == holed.replicas[0]  # b keeps its shard
    assert [r.head.worker_id for r in grown.replicas] == ["b", "c"]
    assert coverage([r.experts for r in grown.replicas], E) == 1
    assert grown.expert_deal is not None
    assert grown.expert_deal.why.startswith("a worker with room took the experts")
    assert _round(joined, {SPEC.model_id: grown}) == grown


def test_a_layer_split_where_the_workers_left_hold_no_deal_of_every_expert() -> None:
    """b holds 5 of 8 when a dies; c joins with room for 2 (a shard of 2 leaves one expert
    on no shard, and 5 + 2 slots hold no deal of 8): the model is split over b and c."""
    def linked(name: str, experts: int) -> WorkerInfo:
        return dataclasses.replace(worker(name, budget(experts)), rpc_host="127.0.0.1",
                                   rtt_ms={"a": 0.5, "b": 0.5, "c": 0.5})

    first = _round({WorkerId(w): linked(w, 5) for w in ("a", "b")}, {})
    assert [r.is_shard for r in first.replicas] == [True, True]
    left = {WorkerId("b"): linked("b", 5), WorkerId("c"): linked("c", 2)}
    later = _round(left, {SPEC.model_id: first})
    assert len(later.replicas) == 1 and later.replicas[0].is_split
    assert later.expert_deal is None and not later.unplaced_reason
    assert _round(left, {SPEC.model_id: later}) == later


READABLE = [
    # (description, workers (budget in experts, lists the file), digest, placed)
    ("every worker reads the file", {"a": (5, True), "b": (5, True)}, SPEC.model_digest, True),
    ("none does: no shards nobody can build", {"a": (5, False), "b": (5, False)},
     SPEC.model_digest, False),
    ("one without room reads it: it sends the shards", {"a": (5, False), "b": (5, False),
                                                        "c": (0, True)}, SPEC.model_digest,
     True),
    ("one of the hosts reads it", {"a": (5, True), "b": (5, False)}, SPEC.model_digest, True),
    ("no digest to match: placed as before", {"a": (5, False), "b": (5, False)}, "", True),
]


@pytest.mark.parametrize(("workers", "digest", "placed"), [c[1:] for c in READABLE],
                         ids=[c[0] for c in READABLE])
def test_shards_only_where_a_worker_reads_the_file(workers: dict[str, tuple[int, bool]],
                                                   digest: str, placed: bool) -> None:
    spec = dataclasses.replace(SPEC, model_digest=digest)
    infos = [worker(w, budget(k) if k else budget(1) - 1, reads) for w, (k, reads)
             in workers.items()]
    placement = place([spec], infos, policy=POLICY)[spec.model_id]
    assert bool(placement.replicas) is placed
    assert (unreadable(spec, infos) == "") is placed
    if not placed:
        assert placement.expert_deal is None
        assert "no worker lists the file of moe (sha256 abababababab)" in \
            placement.unplaced_reason
        assert "put moe.gguf on at least one worker" in placement.unplaced_reason


def test_no_layer_split_either_where_no_worker_reads_the_file() -> None:
    """A split placed while the workers still hash the file would stay a split."""
    near = {"a": 0.5, "b": 0.5}
    infos = [dataclasses.replace(worker(w, budget(3), False), rtt_ms=near, rpc_host="h")
             for w in ("a", "b")]
    assert place([SPEC], [dataclasses.replace(i, model_files=(SPEC.model_digest,))
                          for i in infos], policy=POLICY)[SPEC.model_id].replicas
    assert not place([SPEC], infos, policy=POLICY)[SPEC.model_id].replicas


def test_a_round_refuses_shards_nobody_can_build_then_places_them() -> None:
    blind = _workers({"a": 5, "b": 5}, reads=False)
    refused = _round(blind, {})
    assert not refused.replicas and "no worker lists the file" in refused.unplaced_reason
    placed = _round(_workers({"a": 5, "b": 5}), {SPEC.model_id: refused})
    assert len(placed.replicas) == 2 and not placed.unplaced_reason


def test_nothing_new_is_dealt_once_no_worker_reads_the_file() -> None:
    """Shards already cut serve from the workers' caches; new ones could not be built."""
    first = _round(_workers({"a": 5, "b": 5}), {})
    blind = _workers({"a": 5, "b": 5}, reads=False)
    published = {SPEC.model_id: first}
    assert _round(blind, published) == first  # left alone
    assert _round(blind, published, rankings={SPEC.model_digest: SKEWED}) == first
    assert _round({**blind, **_workers({"c": 6}, reads=False)}, published) == first
    holed = _round({WorkerId("b"): blind[WorkerId("b")]}, published)
    assert holed.replicas == first.replicas[1:]
    assert holed.expert_deal is not None and holed.expert_deal.why.startswith(HOLES)
    assert "no worker lists the file" in holed.expert_deal.why
