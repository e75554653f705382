"""Table-driven tests of placing a mixture-of-experts model by experts (planner/experts.py)
and of that choice inside place()."""

from __future__ import annotations

import dataclasses

import pytest
from meshllm.common import convert, convert_moe, store
from meshllm.common.moe import ExpertRanking, MoeLayout
from meshllm.common.types import (
    ExpertDeal,
    ModelDeclaration,
    ModelId,
    ModelSpec,
    Placement,
    Replica,
    WorkerId,
    WorkerInfo,
    whole,
)
from meshllm.planner.assign import RoundInputs, RoundPolicy, next_placements
from meshllm.planner.declared import parse_inputs
from meshllm.planner.experts import (
    DEFAULT_HOT_SHARE,
    ShardPlan,
    coverage,
    deal,
    deal_layer,
    experts_room,
    grow_shards,
    plan_shards,
    shard_need,
)
from meshllm.planner.place import MiB, PlacementPolicy, place

E, LAYERS = 8, 4
# Trunk 100 MiB (router rows 1 MiB per expert in it), 10 MiB per expert: 180 MiB whole.
LAYOUT = MoeLayout("llama", E, 2, LAYERS, 100 * MiB, 10 * MiB, 1 * MiB, 0)
SPEC = ModelSpec(ModelId("moe"), "moe.gguf", LAYOUT.total_bytes, LAYERS, 1, 0, "llama", 1,
                 moe=LAYOUT, model_digest="ab" * 32)
POLICY = PlacementPolicy(engine_overhead_bytes=0)


def budget(experts: int) -> int:
    """The budget of a worker that holds a shard of exactly `experts` experts."""
    return shard_need(SPEC, experts, 0)


def worker(name: str, mib_or_bytes: int, reads_file: bool = True) -> WorkerInfo:
    """A worker that can read the model's file (lists its sha256) unless told otherwise."""
    return WorkerInfo(WorkerId(name), f"127.0.0.1:{1000 + len(name)}", "cpu", mib_or_bytes, 1,
                      0.0, model_files=(SPEC.model_digest,) if reads_file else ())


def ranking(orders: list[list[int]], tokens: int = 4096) -> ExpertRanking:
    """A ranking whose layer i chooses orders[i][0] most, then orders[i][1], ..."""
    counts = []
    for order in orders:
        layer = [0] * E
        for rank, expert in enumerate(order):
            layer[expert] = 100 - rank
        counts.append(tuple(layer))
    return ExpertRanking(SPEC.model_digest, tuple(counts), tokens, 1.5)


SKEWED = ranking([[7, 6, 5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5, 6, 7],
                  [3, 4, 2, 5, 1, 6, 0, 7], [7, 0, 6, 1, 5, 2, 4, 3]])


def shards(result: ShardPlan | str) -> ShardPlan:
    assert isinstance(result, ShardPlan), result
    return result


def test_room_and_need_agree() -> None:
    for k in range(1, E + 1):
        assert experts_room(SPEC, budget(k), 0) == k
        assert experts_room(SPEC, budget(k) - 1, 0) == k - 1
    assert shard_need(SPEC, E, 0) == SPEC.weights_bytes  # all experts: the whole model


DEALS = [
    # (description, order, sizes, hot, copies, expected per shard)
    ("even, two shards, five each: dealt in turn, spare room to the least held",
     list(range(E)), [5, 5], 0, 1, [(0, 1, 2, 4, 6), (0, 1, 3, 5, 7)]),
    ("hot experts on both shards, the rest dealt once",
     [7, 6, 5, 4, 3, 2, 1, 0], [5, 5], 2, 1, [(1, 3, 5, 6, 7), (0, 2, 4, 6, 7)]),
    ("three shards: every cold expert twice",
     list(range(E)), [6, 6, 6], 0, 2, [(0, 1, 3, 4, 6, 7), (0, 1, 2, 3, 5, 6),
                                       (0, 1, 2, 4, 5, 7)]),
    ("a larger shard takes more of the deal",
     list(range(E)), [6, 2], 0, 1, [(0, 1, 2, 3, 4, 6), (5, 7)]),
]


@pytest.mark.parametrize(("order", "sizes", "hot", "copies", "expected"),
                         [c[1:] for c in DEALS], ids=[c[0] for c in DEALS])
def test_deal_layer(order: list[int], sizes: list[int], hot: int, copies: int,
                    expected: list[tuple[int, ...]]) -> None:
    dealt = deal_layer(order, sizes, hot, copies)
    assert dealt == expected
    assert [len(d) for d in dealt] == sizes
    held = [sum(e in d for d in dealt) for e in range(E)]
    assert min(held) >= copies
    assert all(e in d for e in order[:hot] for d in dealt)


BALANCED = [
    # (description, sizes, hot, copies, routing counts, load carried, expected per shard)
    ("the shard that held the most routing lacks the heaviest cold expert",
     [6, 6, 6], 2, 2, [80, 70, 60, 50, 40, 30, 20, 10], [0, 0, 500],
     [(0, 1, 2, 3, 5, 7), (0, 1, 2, 4, 5, 6), (0, 1, 3, 4, 6, 7)]),
    ("no load carried: the routing held within the layer balances it",
     [6, 6, 6], 2, 2, [80, 70, 60, 50, 40, 30, 20, 10], [0, 0, 0],
     [(0, 1, 2, 3, 6, 7), (0, 1, 2, 4, 5, 7), (0, 1, 3, 4, 5, 6)]),
    ("room comes first: the larger shard takes the heaviest though it held more, "
     "until the rooms are equal",
     [7, 2], 1, 1, [80, 70, 60, 50, 40, 30, 20, 10], [900, 0],
     [(0, 1, 2, 3, 4, 5, 7), (0, 6)]),
]


@pytest.mark.parametrize(("sizes", "hot", "copies", "counts", "load", "expected"),
                         [c[1:] for c in BALANCED], ids=[c[0] for c in BALANCED])
def test_deal_layer_balances_the_routing_held(sizes: list[int], hot: int, copies: int,
                                              counts: list[int], load: list[int],
                                              expected: list[tuple[int, ...]]) -> None:
    dealt = deal_layer(list(range(E)), sizes, hot, copies, counts, load)
    assert dealt == expected
    assert min(sum(e in d for d in dealt) for e in range(E)) >= copies


def test_no_shard_lacks_the_heaviest_cold_expert_of_every_layer() -> None:
    """Each expert chosen twice as often as the next: one shard lacking the heaviest cold
    expert of every layer would lack far more routing than the others."""
    steep = ExpertRanking(SPEC.model_digest, tuple(
        tuple(1 << (E - order.index(e)) for e in range(E)) for order in
        (SKEWED.layer_order(layer) for layer in range(LAYERS))), 4096, 1.0)
    assert [steep.layer_order(layer) for layer in range(LAYERS)] == \
        [SKEWED.layer_order(layer) for layer in range(LAYERS)]
    dealt = deal(LAYOUT, [6, 6, 6], steep, 1.0)  # two hot beside two copies of the rest
    lacking = [{i for i, s in enumerate(dealt) if steep.layer_order(layer)[2] not in s[layer]}
               for layer in range(LAYERS)]
    assert all(len(shards) == 1 for shards in lacking)  # two copies of three
    per_shard = [sum(i in shards for shards in lacking) for i in range(3)]
    assert max(per_shard) == 2 and min(per_shard) == 1  # four layers over three shards


INFEASIBLE = [
    ("three shards of four cannot hold eight experts twice", [4, 4, 4]),
    ("two shards of three cannot hold eight experts once", [3, 3]),
    ("one shard is no deal", [8]),
]


@pytest.mark.parametrize("sizes", [c[1] for c in INFEASIBLE], ids=[c[0] for c in INFEASIBLE])
def test_deal_refuses_sizes_short_of_the_coverage(sizes: list[int]) -> None:
    with pytest.raises(ValueError, match="cannot hold every expert"):
        deal(LAYOUT, sizes, SKEWED, DEFAULT_HOT_SHARE)


PLANS = [
    # (description, budgets in experts, ranking, hot share, shards, least copies, hot share
    #  applied)
    ("two shards of five, even", [5, 5], None, 0.5, 2, 1, 0.0),
    ("two shards of five, ranked: two hot on both", [5, 5], SKEWED, 0.5, 2, 1, 0.4),
    ("three shards of six, even: two copies of everything", [6, 6, 6], None, 0.5, 3, 2, 0.0),
    ("three shards of six, ranked: the hot set shrinks to keep two copies", [6, 6, 6], SKEWED,
     0.5, 3, 2, 0.3333),
    ("hot share 0 with a ranking: no hot set", [5, 5], SKEWED, 0.0, 2, 1, 0.0),
    ("uneven budgets", [7, 3], SKEWED, 0.5, 2, 1, 0.3333),
    ("a worker without room for one expert gets no shard", [5, 5, 0], None, 0.5, 2, 1, 0.0),
    ("four shards of six, hot share 0.5: three hot", [6, 6, 6, 6], SKEWED, 0.5, 4, 2, 0.5),
    ("four shards of six, default share: as many hot as two copies leave room for",
     [6, 6, 6, 6], SKEWED, DEFAULT_HOT_SHARE, 4, 2, 0.6667),
]


@pytest.mark.parametrize(("sizes", "rank", "hot_share", "count", "copies", "applied"),
                         [c[1:] for c in PLANS], ids=[c[0] for c in PLANS])
def test_plan_shards(sizes: list[int], rank: ExpertRanking | None, hot_share: float,
                     count: int, copies: int, applied: float) -> None:
    free = {WorkerId(f"w{i}"): budget(k) if k else budget(1) - 1 for i, k in enumerate(sizes)}
    plan = shards(plan_shards(SPEC, free, 0, rank, hot_share))
    assert len(plan.shards) == count
    selections = [r.experts for r in plan.shards]
    assert coverage(selections, E) >= copies
    for replica in plan.shards:
        assert len(replica.experts) == LAYERS and not replica.is_split
        assert plan.bytes_by_worker[replica.head.worker_id] <= free[replica.head.worker_id]
    assert plan.deal.hot_share == applied
    assert plan.deal.calibration_tokens == (rank.tokens if rank else 0)
    if rank is not None:  # the hot experts of each layer are on every shard
        hot = round(applied * min(s for s in sizes if s))
        for layer in range(LAYERS):
            top = rank.layer_order(layer)[:hot]
            assert all(e in s[layer] for s in selections for e in top)


def test_ranked_layers_differ_where_even_ones_do_not() -> None:
    free = {WorkerId("a"): budget(5), WorkerId("b"): budget(5)}
    even = shards(plan_shards(SPEC, free, 0)).shards[0].experts
    ranked = shards(plan_shards(SPEC, free, 0, SKEWED)).shards[0].experts
    assert len(set(even)) == 1
    assert len(set(ranked)) > 1


REFUSALS = [
    ("one worker only", {WorkerId("a"): budget(7)}, "need two workers"),
    ("no room for the trunk", {WorkerId("a"): budget(1) - 1, WorkerId("b"): budget(1) - 1},
     "need two workers"),
    ("two shards of three miss two experts", {WorkerId("a"): budget(3), WorkerId("b"): budget(3)},
     "2 expert copies unplaced"),
    ("three shards of four cannot hold every expert twice",
     {WorkerId("a"): budget(4), WorkerId("b"): budget(4), WorkerId("c"): budget(4)},
     "every expert must live on 2 shard(s)"),
]


@pytest.mark.parametrize(("free", "words"), [c[1:] for c in REFUSALS],
                         ids=[c[0] for c in REFUSALS])
def test_refusals_explain_themselves(free: dict[WorkerId, int], words: str) -> None:
    why = plan_shards(SPEC, free, 0)
    assert isinstance(why, str) and words in why


def test_a_ranking_of_another_shape_means_an_even_deal() -> None:
    wrong = ExpertRanking(SPEC.model_digest, ((1, 2, 3),) * LAYERS, 100, 0.1)
    plan = shards(plan_shards(SPEC, {WorkerId("a"): budget(5), WorkerId("b"): budget(5)}, 0,
                              wrong))
    assert plan.deal.calibration_tokens == 0 and "even deal" in plan.deal.why


def test_max_shards_and_previous_hosts_first() -> None:
    free = {WorkerId(w): budget(6) for w in ("a", "b", "c")}
    previous = Placement(SPEC.model_id, (whole(WorkerId("c"), LAYERS),), 0)
    plan = shards(plan_shards(SPEC, free, 0, max_shards=2, previous=previous))
    assert [r.head.worker_id for r in plan.shards] == ["c", "a"]


PLACES = [
    # (description, spec changes, budgets, kind of replicas)
    ("fits one worker whole: served whole as before", {}, [SPEC.weights_bytes, budget(5)],
     "whole"),
    ("fits none: expert shards", {}, [budget(6), budget(6), budget(6)], "shards"),
    ("fits none, set to split: a layer split", {"force_split": True},
     [budget(5), budget(5), budget(5)], "split"),
    ("a dense model that fits none is split", {"moe": None},
     [budget(5), budget(5), budget(5)], "split"),
]


@pytest.mark.parametrize(("changes", "budgets", "kind"), [c[1:] for c in PLACES],
                         ids=[c[0] for c in PLACES])
def test_place_chooses_whole_shards_or_split(changes: dict[str, object], budgets: list[int],
                                             kind: str) -> None:
    spec = dataclasses.replace(SPEC, **changes)  # type: ignore[arg-type]
    workers = [worker(f"w{i}", b) for i, b in enumerate(budgets)]
    placement = place([spec], workers, policy=POLICY)[spec.model_id]
    kinds = {"whole" if not (r.is_split or r.is_shard) else "shards" if r.is_shard
             else "split" for r in placement.replicas}
    assert kinds == {kind}
    assert (placement.expert_deal is not None) == (kind == "shards")
    if kind == "shards":
        assert len(placement.replicas) == 3


def test_place_explains_when_neither_shards_nor_split_fit() -> None:
    workers = [worker("a", budget(1) - 1), worker("b", budget(1) - 1)]
    placement = place([SPEC], workers, policy=POLICY)[SPEC.model_id]
    assert not placement.replicas
    assert "expert shards need two workers" in placement.unplaced_reason


def test_shards_take_the_memory_whole_models_leave() -> None:
    """Shards shrink to the room there is and whole replicas cannot: whole models choose
    first, though smaller."""
    small = ModelSpec(ModelId("small"), "small.gguf", 50 * MiB, 4, 1, 0, "llama", 1)
    workers = [worker("a", budget(3) + 50 * MiB), worker("b", budget(5))]
    placed = place([SPEC, small], workers, policy=POLICY)
    assert placed[small.model_id].worker_ids == ("a",)
    assert sorted(len(r.experts[0]) for r in placed[SPEC.model_id].replicas) == [3, 5]


def test_shards_and_deal_survive_the_wire() -> None:
    plan = shards(plan_shards(SPEC, {WorkerId("a"): budget(5), WorkerId("b"): budget(6)}, 0,
                              SKEWED))
    placement = Placement(SPEC.model_id, plan.shards, 123, "", plan.deal)
    raw = convert.placement_to_pb(placement).SerializeToString()
    assert convert.parse_placement(raw) == placement
    spec = convert.parse_model_spec(convert.model_spec_to_pb(SPEC).SerializeToString())
    assert spec == SPEC


def test_a_ragged_shard_is_refused_on_the_wire() -> None:
    ragged = Replica(whole(WorkerId("a"), LAYERS).stages, experts=((0, 1), (2,)))
    raw = convert.placement_to_pb(Placement(SPEC.model_id, (ragged,), 1, "",
                                            ExpertDeal(0.5))).SerializeToString()
    with pytest.raises(Exception, match="holds 1 experts"):
        convert.parse_placement(raw)


GROWS = [
    # (description, budgets placed first, budgets joining, ranking, coverage after)
    ("a third shard of six lifts two shards of six to two copies", [6, 6], [6], None, 2),
    ("ranked: the new shard takes the hot experts and the least held", [6, 6], [6], SKEWED, 2),
    ("a small newcomer still adds copies of the least held", [5, 5], [2, 2], None, 1),
]


@pytest.mark.parametrize(("first", "joining", "rank", "after"), [c[1:] for c in GROWS],
                         ids=[c[0] for c in GROWS])
def test_shards_grow_onto_workers_that_join(first: list[int], joining: list[int],
                                            rank: ExpertRanking | None, after: int) -> None:
    free = {WorkerId(f"w{i}"): budget(k) for i, k in enumerate(first)}
    placed = shards(plan_shards(SPEC, free, 0, rank)).shards
    newcomers = {WorkerId(f"n{i}"): budget(k) for i, k in enumerate(joining)}
    added = grow_shards(SPEC, placed, {**{w: 0 for w in free}, **newcomers}, 0, rank)
    assert [r.head.worker_id for r in added] == sorted(newcomers)
    assert [len(r.experts[0]) for r in added] == joining
    selections = [r.experts for r in (*placed, *added)]
    assert coverage(selections, E) == after >= coverage([r.experts for r in placed], E)
    assert grow_shards(SPEC, placed, newcomers, 0, rank, max_shards=2) == []


def test_a_round_adds_a_shard_for_a_worker_that_joined() -> None:
    declared = ModelDeclaration(SPEC.model_id, SPEC.source)
    two = {WorkerId(w): worker(w, budget(6)) for w in ("a", "b")}
    inputs = RoundInputs({SPEC.model_id: SPEC}, {SPEC.model_id: declared}, two, {}, {}, 0.0)
    first = next_placements(inputs, RoundPolicy(PlacementPolicy(engine_overhead_bytes=0)))
    placed = first.placements[SPEC.model_id]
    assert len(placed.replicas) == 2 and placed.expert_deal is not None
    three = {**two, WorkerId("c"): worker("c", budget(6))}
    later = next_placements(dataclasses.replace(inputs, workers=three,
                                                published=first.placements),
                            RoundPolicy(PlacementPolicy(engine_overhead_bytes=0)))
    grown = later.placements[SPEC.model_id]
    assert grown.replicas[:2] == placed.replicas  # the shards placed stay as they were
    assert grown.replicas[2].head.worker_id == "c" and grown.expert_deal == placed.expert_deal
    assert coverage([r.experts for r in grown.replicas], E) == 2


def test_the_planner_reads_rankings_by_model_digest() -> None:
    raw = {store.MOE_RANKINGS + SKEWED.model_digest:
           convert_moe.ranking_to_pb(SKEWED).SerializeToString(),
           store.MOE_RANKINGS + "junk": b"\xff\xff"}
    inputs = parse_inputs(raw)
    assert inputs.rankings == {SKEWED.model_digest: SKEWED}
    free = [worker("a", budget(5)), worker("b", budget(5))]
    placed = place([SPEC], free, policy=POLICY, rankings=inputs.rankings)[SPEC.model_id]
    assert placed.expert_deal is not None and placed.expert_deal.calibration_tokens == 4096


def test_shards_dealt_evenly_are_dealt_again_once_a_calibration_arrives() -> None:
    declared = ModelDeclaration(SPEC.model_id, SPEC.source)
    workers = {WorkerId(w): worker(w, budget(5)) for w in ("a", "b")}
    policy = RoundPolicy(PlacementPolicy(engine_overhead_bytes=0))
    inputs = RoundInputs({SPEC.model_id: SPEC}, {SPEC.model_id: declared}, workers, {}, {}, 0.0)
    even = next_placements(inputs, policy).placements
    assert even[SPEC.model_id].expert_deal.calibration_tokens == 0  # type: ignore[union-attr]
    ranked = next_placements(dataclasses.replace(
        inputs, published=even, rankings={SPEC.model_digest: SKEWED}), policy).placements
    placement = ranked[SPEC.model_id]
    assert placement.expert_deal is not None and placement.expert_deal.calibration_tokens
    assert [r.head.worker_id for r in placement.replicas] == ["a", "b"]
    assert placement.replicas != even[SPEC.model_id].replicas
    again = next_placements(dataclasses.replace(
        inputs, published=ranked, rankings={SPEC.model_digest: SKEWED}), policy).placements
    assert again == ranked  # dealt once by the ranking, then left alone
