"""Table-driven tests of one planning round (`assign.next_placements`): first replicas,
rebalancing moves as placements, retiring replicas, drains and filling free memory."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import pytest
from meshllm.common.demand import ModelDemand
from meshllm.common.types import (
    LoadState,
    ModelDeclaration,
    ModelId,
    ModelSpec,
    ModelState,
    Placement,
    Replica,
    WorkerId,
    WorkerInfo,
    whole,
)
from meshllm.planner.assign import RoundInputs, RoundPolicy, live_replicas, next_placements
from meshllm.planner.demand import RebalancePolicy, ReplicaPhase
from meshllm.planner.place import MiB, PlacementPolicy

NOW = 10_000.0
LONG_AGO = NOW - 3600
QUICK = RebalancePolicy(min_age_s=0, cooldown_s=0, min_window_s=1, min_requests=1)
FILL = RoundPolicy(PlacementPolicy(0), QUICK, fill_free_memory=True)
BY_DEMAND = RoundPolicy(PlacementPolicy(0), QUICK, fill_free_memory=False)


def spec(name: str, mib: int = 100, *, split: bool = False) -> ModelSpec:
    return ModelSpec(ModelId(name), f"{name}.gguf", mib * MiB, 10, 1, 0, "llama", 1,
                     layer_bytes=(mib * MiB // 10,) * 10, force_split=split)


def worker(name: str, mib: int = 150, ready: tuple[str, ...] = (),
           draining: tuple[str, ...] = (), loading: tuple[str, ...] = ()) -> WorkerInfo:
    states = [ModelState(ModelId(m), LoadState.READY) for m in ready]
    states += [ModelState(ModelId(m), LoadState.READY, draining=True) for m in draining]
    states += [ModelState(ModelId(m), LoadState.LOADING) for m in loading]
    return WorkerInfo(WorkerId(name), "127.0.0.1:1", "cpu", mib * MiB, 1, 0.0,
                      tuple(states))


def placed(model: str, *hosts: str, retiring: tuple[str, ...] = ()) -> Placement:
    replicas = [whole(WorkerId(h), 10) for h in hosts]
    replicas += [dataclasses.replace(whole(WorkerId(h), 10), retiring=True) for h in retiring]
    return Placement(ModelId(model), tuple(replicas), 100 * MiB)


def hot(name: str, load: float = 3.0) -> ModelDemand:
    return ModelDemand(ModelId(name), 60.0, 1.0, mean_service_s=load, idle_s=0.0)


def cold(name: str) -> ModelDemand:
    return ModelDemand(ModelId(name), 60.0, idle_s=3000.0)


def inputs(specs: list[ModelSpec], workers: list[WorkerInfo],
           published: list[Placement] = (),  # type: ignore[assignment]
           demand: list[ModelDemand] = (),  # type: ignore[assignment]
           declarations: Mapping[str, ModelDeclaration] | None = None) -> RoundInputs:
    decls = {ModelId(k): v for k, v in (declarations or {}).items()}
    for s in specs:
        decls.setdefault(s.model_id, ModelDeclaration(s.model_id, s.source))
    replicas = {(p.model_id, r.head.worker_id): (ReplicaPhase.READY, LONG_AGO)
                for p in published for r in p.replicas if not r.retiring}
    return RoundInputs(
        specs={s.model_id: s for s in specs}, declarations=decls,
        workers={w.worker_id: w for w in workers},
        published={p.model_id: p for p in published},
        demand={d.model_id: d for d in demand}, now_s=NOW, since_s=replicas)


def hosts(placement: Placement) -> list[tuple[str, bool]]:
    return [(r.head.worker_id, r.retiring) for r in placement.replicas]


B_GOES_HOT = inputs([spec("a"), spec("b")],
                    [worker("w1", ready=("a",)), worker("w2", ready=("a",)),
                     worker("w3", ready=("b",))],
                    [placed("a", "w1", "w2"), placed("b", "w3")], [cold("a"), hot("b", 1.0)])

CASES = [
    pytest.param(
        inputs([spec("a"), spec("b")], [worker("w1"), worker("w2"), worker("w3")]), FILL,
        {"a": [("w1", False), ("w3", False)], "b": [("w2", False)]},
        id="a-fresh-mesh-gives-every-model-a-replica-and-fills-the-rest"),
    pytest.param(
        inputs([spec("a"), spec("b")], [worker("w1"), worker("w2"), worker("w3")]),
        BY_DEMAND, {"a": [], "b": []},
        id="without-fill-a-model-nobody-asked-for-holds-no-worker"),
    pytest.param(
        inputs([spec("a"), spec("b")], [worker("w1"), worker("w2")],
               demand=[ModelDemand(ModelId("b"), 60.0, waiting_requests=1)]),
        BY_DEMAND, {"a": [], "b": [("w1", False)]},
        id="without-fill-a-request-waiting-brings-up-a-first-replica"),
    pytest.param(
        inputs([spec("a")], [worker("w1"), worker("w2")],
               declarations={"a": ModelDeclaration(ModelId("a"), "a.gguf", min_replicas=2)}),
        BY_DEMAND, {"a": [("w1", False), ("w2", False)]},
        id="min-replicas-are-placed-without-demand"),
    pytest.param(
        B_GOES_HOT, FILL, {"a": [("w1", True), ("w2", False)], "b": [("w1", False), ("w3", False)]},
        id="a-hot-model-takes-a-replica-of-a-cold-one-which-retires"),
    pytest.param(
        inputs([spec("a"), spec("b")],
               [worker("w1", ready=("a",)), worker("w2", draining=("a",)),
                worker("w3", ready=("b",))],
               [placed("a", "w1", retiring=("w2",)), placed("b", "w2", "w3")],
               [cold("a"), hot("b", 1.0)]),
        FILL, {"a": [("w1", False), ("w2", True)], "b": [("w2", False), ("w3", False)]},
        id="a-replica-still-draining-stays-retiring-and-nothing-moves-twice"),
    pytest.param(
        inputs([spec("a"), spec("b")],
               [worker("w1", ready=("a",)), worker("w2", ready=("b",)),
                worker("w3", ready=("b",))],
               [placed("a", "w1", retiring=("w2",)), placed("b", "w2", "w3")],
               [cold("a"), hot("b", 1.0)]),
        FILL, {"a": [("w1", False)], "b": [("w2", False), ("w3", False)]},
        id="a-drained-replica-leaves-the-placement"),
    pytest.param(
        inputs([spec("a"), spec("b")],
               [worker("w1", ready=("a",)), worker("w3", ready=("b",)), worker("w4")],
               [placed("a", "w1", retiring=("w2",)), placed("b", "w2", "w3")],
               [cold("a"), hot("b", 1.0)]),
        BY_DEMAND, {"a": [("w1", False)], "b": [("w3", False), ("w4", False)]},
        id="the-worker-a-move-was-landing-on-leaves-mid-move-and-it-lands-elsewhere"),
    pytest.param(
        inputs([spec("a")], [worker("w1", ready=("a",))],
               [placed("a", "w1", "gone")], [hot("a", 0.5)]),
        FILL, {"a": [("w1", False)]},
        id="a-replica-on-a-worker-that-left-is-dropped"),
    pytest.param(
        inputs([spec("a")], [worker(f"w{i}", ready=("a",)) for i in range(1, 4)],
               [placed("a", "w1", "w2", "w3")], [cold("a")],
               {"a": ModelDeclaration(ModelId("a"), "a.gguf", max_replicas=1)}),
        FILL, {"a": [("w1", True), ("w2", True), ("w3", False)]},
        id="over-max-replicas-retires-the-surplus-down-to-the-cap"),
    pytest.param(
        inputs([spec("a"), spec("b")], [worker(f"w{i}") for i in range(1, 5)],
               declarations={"a": ModelDeclaration(ModelId("a"), "a.gguf", max_replicas=1)}),
        FILL, {"a": [("w1", False)], "b": [("w2", False), ("w3", False), ("w4", False)]},
        id="fill-honours-each-declarations-max-replicas"),
    pytest.param(
        inputs([spec("big", 250)], [worker("w1"), worker("w2")]), FILL,
        {"big": [("w1", False)]},
        id="a-model-no-worker-holds-is-split-and-left-to-placement"),
]


@pytest.mark.parametrize(("given", "policy", "expected"), CASES)
def test_round(given: RoundInputs, policy: RoundPolicy,
               expected: dict[str, list[tuple[str, bool]]]) -> None:
    result = next_placements(given, policy)
    assert {m: hosts(p) for m, p in result.placements.items()} == expected


def test_a_split_model_keeps_its_stages_and_rebalancing_leaves_it_alone() -> None:
    given = inputs([spec("big", 250)], [worker("w1"), worker("w2"), worker("w3")],
                   demand=[hot("big", 9.0)])
    result = next_placements(given, FILL)
    (replica,) = result.placements[ModelId("big")].replicas
    assert replica.is_split and not result.moves.adds


def test_a_model_that_fits_nowhere_says_why() -> None:
    given = inputs([spec("huge", 1000)], [worker("w1"), worker("w2")])
    placement = next_placements(given, FILL).placements[ModelId("huge")]
    assert not placement.replicas
    assert "needs" in placement.unplaced_reason


def test_a_model_waiting_for_room_is_not_called_unservable() -> None:
    full = inputs([spec("a"), spec("b")], [worker("w1", ready=("a",))],
                  [placed("a", "w1")], [hot("a", 0.7)])
    placement = next_placements(full, FILL).placements[ModelId("b")]
    assert placement == Placement(ModelId("b"), (), 100 * MiB, "")  # waits, not refused


def test_the_same_inputs_give_the_same_round_twice() -> None:
    assert next_placements(B_GOES_HOT, FILL) == next_placements(B_GOES_HOT, FILL)


def test_a_round_applied_then_replanned_moves_nothing_more() -> None:
    first = next_placements(B_GOES_HOT, FILL)
    again = dataclasses.replace(B_GOES_HOT, published=first.placements)
    second = next_placements(again, FILL)
    assert second.placements == first.placements and not second.moves.count


@pytest.mark.parametrize(("replica", "states", "kept"), [
    (whole(WorkerId("w1"), 10), {"w1": ()}, True),            # loading: stays
    (Replica((whole(WorkerId("w1"), 10).head,), retiring=True), {"w1": ("a",)}, True),
    (Replica((whole(WorkerId("w1"), 10).head,), retiring=True), {"w1": ()}, False),
    (whole(WorkerId("w9"), 10), {"w1": ()}, False),           # its worker left
])
def test_live_replicas(replica: Replica, states: dict[str, tuple[str, ...]],
                       kept: bool) -> None:
    workers = {WorkerId(w): worker(w, ready=m) for w, m in states.items()}
    placement = Placement(ModelId("a"), (replica,), 1)
    assert (live_replicas(placement, workers) == (replica,)) is kept
