"""Table-driven tests of the planner's rebalancing decision."""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from meshllm.common.errors import ConfigError
from meshllm.common.types import ModelId, WorkerId
from meshllm.planner.demand import (
    CurrentAssignment,
    HeldReplica,
    ModelDemand,
    Moves,
    RebalancePolicy,
    ReplicaPhase,
    SizedModel,
    WorkerCapacity,
)
from meshllm.planner.place import MiB
from meshllm.planner.rebalance import rebalance, wanted_replicas

READY, LOADING, RETIRING = ReplicaPhase.READY, ReplicaPhase.LOADING, ReplicaPhase.RETIRING
POLICY = RebalancePolicy()
EARLY = RebalancePolicy(retire_cold_early=True)
NOW = 10_000.0
OLD = NOW - 3600  # past min_age_s
YOUNG = NOW - 10  # inside min_age_s


def decl(name: str, mib: int = 100, lo: int = 0, hi: int | None = None,
         prio: int = 0) -> SizedModel:
    return SizedModel(ModelId(name), mib * MiB, lo, hi, prio)


def idle(name: str) -> ModelDemand:
    """A whole window without a request, and none before it either."""
    return ModelDemand(ModelId(name))


def busy(name: str, load: float, rps: float = 1.0, **more: Any) -> ModelDemand:
    """Demand worth `load` replicas of one slot: `rps` requests a second (and any refused
    ones) holding a slot `load / rps` seconds each."""
    return ModelDemand(ModelId(name), 60.0, rps, mean_service_s=load / rps, **more)


@dataclass
class Mesh:
    """Workers with budgets and what they hold; free memory follows from both."""

    budgets: dict[str, int]  # worker -> MiB
    held: list[HeldReplica] = field(default_factory=list)
    leaving: set[str] = field(default_factory=set)
    max_models: int = 0
    now_s: float = NOW
    last_grew_s: dict[ModelId, float] = field(default_factory=dict)
    last_shrank_s: dict[ModelId, float] = field(default_factory=dict)

    def workers(self, models: Sequence[SizedModel]) -> list[WorkerCapacity]:
        size = {m.model_id: m.replica_bytes for m in models}
        return [WorkerCapacity(WorkerId(w), mib * MiB - sum(
            size.get(r.model_id, 0) for r in self.held if r.worker_id == w),
            self.max_models, w in self.leaving) for w, mib in sorted(self.budgets.items())]

    def current(self) -> CurrentAssignment:
        return CurrentAssignment(self.now_s, tuple(self.held), dict(self.last_grew_s),
                                 dict(self.last_shrank_s))

    def decide(self, models: Sequence[SizedModel],
               demand: Mapping[str, ModelDemand], policy: RebalancePolicy = POLICY) -> Moves:
        by_id = {ModelId(k): v for k, v in demand.items()}
        return rebalance(models, self.workers(models), by_id, self.current(), policy)

    def apply(self, moves: Moves) -> None:
        """What the planner's executor does: adds start loading, retires drain and go."""
        gone = {(r.model_id, r.worker_id) for r in moves.retires}
        self.held = [r for r in self.held if (r.model_id, r.worker_id) not in gone]
        self.held += [HeldReplica(a.model_id, a.worker_id, LOADING, self.now_s)
                      for a in moves.adds]
        self.last_grew_s.update({a.model_id: self.now_s for a in moves.adds})
        self.last_shrank_s.update({r.model_id: self.now_s for r in moves.retires})

    def finish_loading(self, at_s: float) -> None:
        self.held = [dataclasses.replace(r, phase=READY, since_s=at_s) if r.phase is LOADING
                     else r for r in self.held]
        self.now_s = at_s


def ready(model: str, *workers: str, since: float = OLD,
          phase: ReplicaPhase = READY) -> list[HeldReplica]:
    return [HeldReplica(ModelId(model), WorkerId(w), phase, since) for w in workers]


def adds(moves: Moves) -> list[tuple[str, str]]:
    return sorted((a.model_id, a.worker_id) for a in moves.adds)


def retires(moves: Moves) -> list[tuple[str, str]]:
    return sorted((r.model_id, r.worker_id) for r in moves.retires)


FOUR = {"w1": 100, "w2": 100, "w3": 100, "w4": 100}
CASES = [
    # (description, models, mesh, demand, expected adds, expected retires)
    ("hot model gets a free worker",
     [decl("a")], Mesh(FOUR, ready("a", "w1")), {"a": busy("a", 1.5)},
     [("a", "w2"), ("a", "w3")], []),
    ("a hot model is sized in one step, not one replica per round",
     [decl("a")], Mesh({f"w{i}": 100 for i in range(8)}, ready("a", "w0")),
     {"a": busy("a", 3.0)}, [("a", f"w{i}") for i in range(1, 5)], []),
    ("a cold model keeps its replicas while nobody needs the memory",
     [decl("a")], Mesh(FOUR, ready("a", "w1", "w2", "w3")), {"a": busy("a", 0.3)}, [], []),
    ("inside the dead band nothing moves",
     [decl("a")], Mesh(FOUR, ready("a", "w1", "w2")), {"a": busy("a", 1.2)}, [], []),
    ("an idle model keeps its replicas while nobody needs the memory",
     [decl("a")], Mesh(FOUR, ready("a", "w1", "w2")), {"a": idle("a")}, [], []),
    ("min_replicas is filled with no demand",
     [decl("a", lo=2)], Mesh(FOUR), {}, [("a", "w1"), ("a", "w2")], []),
    ("max_replicas caps a hot model",
     [decl("a", hi=2)], Mesh(FOUR, ready("a", "w1")), {"a": busy("a", 5.0)}, [("a", "w2")],
     []),
    ("over max_replicas (lowered at run time) retires at once, young or not",
     [decl("a", hi=1)], Mesh(FOUR, ready("a", "w1", "w2", since=YOUNG)),
     {"a": busy("a", 0.5)}, [], [("a", "w1")]),
    ("higher priority gets the only free worker",
     [decl("lo"), decl("hi", prio=1)],
     Mesh({"w1": 100, "w2": 100, "w3": 100}, ready("lo", "w1") + ready("hi", "w2")),
     {"lo": busy("lo", 2.0), "hi": busy("hi", 2.0)}, [("hi", "w3")], []),
    ("a cold start needs one request, no minimum count",
     [decl("a")], Mesh(FOUR), {"a": busy("a", 0.0, rps=1 / 60)}, [("a", "w1")], []),
    ("too few requests in the window: no add however busy",
     [decl("a")], Mesh(FOUR, ready("a", "w1")), {"a": busy("a", 2.0, rps=0.1)}, [], []),
    ("a long queue wait counts as hot over target",
     [decl("a")], Mesh(FOUR, ready("a", "w1", "w2")),
     {"a": busy("a", 1.3, mean_queue_wait_s=5.0)}, [("a", "w3")], []),
    ("a long queue wait under target is a backlog draining",
     [decl("a")], Mesh(FOUR, ready("a", "w1", "w2")),
     {"a": busy("a", 1.1, mean_queue_wait_s=40.0)}, [], []),
    ("refused requests count as load",
     [decl("a")], Mesh(FOUR, ready("a", "w1")), {"a": busy("a", 0.7, refused_per_s=1.0)},
     [("a", "w2"), ("a", "w3")], []),
    ("a model no longer declared is retired",
     [decl("a")], Mesh(FOUR, ready("a", "w1") + ready("gone", "w2")), {"a": busy("a", 0.5)},
     [], [("gone", "w2")]),
    ("adding to a free worker beats evicting a cold model",
     [decl("a"), decl("cold")],
     Mesh({"w1": 100, "w2": 100, "w3": 100}, ready("a", "w1") + ready("cold", "w2")),
     {"a": busy("a", 0.9), "cold": busy("cold", 0.5)}, [("a", "w3")], []),
    ("a full mesh evicts a lower-priority model's spare replica",
     [decl("a", prio=1), decl("b")],
     Mesh({"w1": 100, "w2": 100, "w3": 100}, ready("a", "w1") + ready("b", "w2", "w3")),
     {"a": busy("a", 0.9), "b": busy("b", 1.0)}, [("a", "w2")], [("b", "w2")]),
    ("an idle model gives up its last replica when the memory is wanted",
     [decl("a"), decl("idle")], Mesh({"w1": 100, "w2": 100}, ready("a", "w1") + ready(
         "idle", "w2")), {"a": busy("a", 0.9), "idle": idle("idle")}, [("a", "w2")],
     [("idle", "w2")]),
    ("equal priority: only a model that stays under target gives a replica",
     [decl("a"), decl("b")],
     Mesh({"w1": 100, "w2": 100, "w3": 100}, ready("a", "w1") + ready("b", "w2", "w3")),
     {"a": busy("a", 0.9), "b": busy("b", 1.0)}, [], []),
    ("the coldest donor gives, not the warm one",
     [decl("a", prio=1), decl("warm"), decl("cool")],
     Mesh({f"w{i}": 100 for i in range(5)},
          ready("a", "w0") + ready("warm", "w1", "w2") + ready("cool", "w3", "w4")),
     {"a": busy("a", 0.9), "warm": busy("warm", 1.1), "cool": busy("cool", 0.5)},
     [("a", "w3")], [("cool", "w3")]),
    ("a worker's max_models counts",
     [decl("a"), decl("b")], dataclasses.replace(Mesh(
         {"w1": 300, "w2": 300}, ready("a", "w1") + ready("b", "w2")), max_models=1),
     {"a": busy("a", 0.9), "b": busy("b", 0.5)}, [], []),
]


EARLY_CASES = [
    # the same, with cold surplus retired at once (RebalancePolicy.retire_cold_early)
    ("early: a cold model shrinks to its target, keeping one",
     [decl("a")], Mesh(FOUR, ready("a", "w1", "w2", "w3")), {"a": busy("a", 0.3)},
     [], [("a", "w1"), ("a", "w2")]),
    ("early: a cold model with min_replicas 0 and no demand goes to zero",
     [decl("a")], Mesh(FOUR, ready("a", "w1", "w2")), {"a": idle("a")}, [],
     [("a", "w1"), ("a", "w2")]),
    ("early: min_replicas is kept with no demand",
     [decl("a", lo=1)], Mesh(FOUR, ready("a", "w1", "w2")), {"a": idle("a")}, [],
     [("a", "w1")]),
    ("early: a hot model takes the memory a cold one gives back",
     [decl("a"), decl("cold")], Mesh({"w1": 100, "w2": 100, "w3": 100},
                                     ready("a", "w1") + ready("cold", "w2", "w3")),
     {"a": busy("a", 0.9), "cold": busy("cold", 0.1)}, [("a", "w2")], [("cold", "w2")]),
]
ALL_CASES = [(*c, POLICY) for c in CASES] + [(*c, EARLY) for c in EARLY_CASES]


@pytest.mark.parametrize(("models", "mesh", "demand", "added", "retired", "policy"),
                         [c[1:] for c in ALL_CASES], ids=[c[0] for c in ALL_CASES])
def test_rebalance(models: list[SizedModel], mesh: Mesh, demand: dict[str, ModelDemand],
                   added: list[tuple[str, str]], retired: list[tuple[str, str]],
                   policy: RebalancePolicy) -> None:
    moves = mesh.decide(models, demand, policy)
    assert (adds(moves), retires(moves)) == (added, retired), moves.blocked
    assert all(a.reason for a in moves.adds) and all(r.reason for r in moves.retires)


@pytest.mark.parametrize(("models", "mesh", "demand", "policy"),
                         [(*c[1:4], c[6]) for c in ALL_CASES], ids=[c[0] for c in ALL_CASES])
def test_applying_the_moves_then_asking_again_moves_nothing(
        models: list[SizedModel], mesh: Mesh, demand: dict[str, ModelDemand],
        policy: RebalancePolicy) -> None:
    mesh = copy.deepcopy(mesh)  # the table stays as written for the other tests
    mesh.apply(mesh.decide(models, demand, policy))
    again = mesh.decide(models, demand, policy)
    assert again.count == 0, (again.adds, again.retires)


WANTED = [
    # (description, load, replicas it has on staying workers, wanted)
    ("idle", 0.0, 2, 0),
    ("hot: sized to target", 2.4, 2, 4),
    ("hot: at least one more", 0.85, 1, 2),
    ("hot no more: replicas loading count", 2.4, 4, 4),
    ("dead band keeps what it has", 1.2, 2, 2),
    ("a leaving worker's replica is replaced when the rest would run hot", 1.2, 1, 2),
    ("... and not when the rest suffice", 0.7, 1, 1),
    ("cold: sized to target", 0.9, 5, 2),
    ("cold: one while it has requests", 0.1, 2, 1),
    ("no replica: one", 0.0001, 0, 1),
]


@pytest.mark.parametrize(("load", "have", "wanted"),
                         [c[1:] for c in WANTED], ids=[c[0] for c in WANTED])
def test_wanted_replicas(load: float, have: int, wanted: int) -> None:
    demand = busy("a", load) if load else ModelDemand(ModelId("a"))
    assert wanted_replicas(decl("a"), demand, have, POLICY).count == wanted


def test_not_enough_memory_says_sizes() -> None:
    mesh = Mesh({"w1": 600, "w2": 200}, ready("a", "w1"))
    moves = mesh.decide([decl("a", mib=500)], {"a": busy("a", 0.9)})
    assert moves.count == 0
    reason = moves.blocked_reason(ModelId("a"))
    assert "needs 500.0 MiB per replica" in reason and "200.0 MiB" in reason


def test_blocks_are_explained() -> None:
    at_max = Mesh(FOUR, ready("a", "w1")).decide([decl("a", hi=1)], {"a": busy("a", 5.0)})
    assert at_max.count == 0 and "capped at max_replicas 1" in at_max.blocked_reason(ModelId("a"))
    full = dataclasses.replace(Mesh({"w1": 300, "w2": 300}, ready("a", "w1") + ready("b", "w2")),
                               max_models=1).decide([decl("a"), decl("b")],
                                                    {"a": busy("a", 0.9), "b": busy("b", 0.5)})
    assert "at its max_models" in full.blocked_reason(ModelId("a"))


def test_leaving_worker_is_replaced_and_not_retired_here() -> None:
    mesh = Mesh(FOUR, ready("a", "w1", "w2"), leaving={"w1"})
    moves = mesh.decide([decl("a")], {"a": busy("a", 1.2)})
    assert adds(moves) == [("a", "w3")] and retires(moves) == []
    mesh.apply(moves)
    assert mesh.decide([decl("a")], {"a": busy("a", 1.2)}).count == 0


def test_worker_leaving_mid_move_gets_the_load_elsewhere() -> None:
    mesh = Mesh(FOUR, ready("a", "w1") + ready("a", "w2", since=YOUNG, phase=LOADING))
    assert mesh.decide([decl("a")], {"a": busy("a", 1.0)}).count == 0  # w2 will carry it
    mesh.leaving = {"w2"}
    moves = mesh.decide([decl("a")], {"a": busy("a", 1.0)})
    assert adds(moves) == [("a", "w3")]


def test_last_ready_replica_stays_while_its_replacement_loads() -> None:
    mesh = Mesh(FOUR, ready("a", "w1") + ready("a", "w2", since=YOUNG, phase=LOADING))
    moves = mesh.decide([decl("a")], {"a": busy("a", 0.1)}, EARLY)
    assert moves.count == 0
    assert "make-before-break" in moves.blocked_reason(ModelId("a"))


def test_a_donor_keeps_its_last_ready_replica() -> None:
    mesh = Mesh({"w1": 100, "w2": 100}, ready("a", "w1") + ready("b", "w2"))
    moves = mesh.decide([decl("a", prio=5), decl("b")], {"a": busy("a", 0.9),
                                                          "b": busy("b", 0.1)})
    assert moves.count == 0 and "make room" in moves.blocked_reason(ModelId("a"))


def test_eviction_waits_for_the_donor_to_unload() -> None:
    mesh = Mesh({"w1": 100, "w2": 100, "w3": 100}, ready("a", "w1") + ready("b", "w2", "w3"))
    moves = mesh.decide([decl("a", prio=1), decl("b")], {"a": busy("a", 0.9), "b": idle("b")})
    assert retires(moves) == [("b", "w2")] and adds(moves) == [("a", "w2")]
    assert moves.adds[0].after == (ModelId("b"),)


def test_no_figures_is_no_measurement() -> None:
    """A gateway restarting publishes nothing for a while: nothing retires meanwhile."""
    mesh = Mesh(FOUR, ready("a", "w1", "w2"))
    assert mesh.decide([decl("a")], {}, EARLY).count == 0
    assert mesh.decide([decl("a")], {"a": idle("a")}, EARLY).count == 2
    full = Mesh({"w1": 100, "w2": 100}, ready("a", "w1") + ready("b", "w2"))
    moves = full.decide([decl("a", prio=1), decl("b")], {"a": busy("a", 0.9)})
    assert moves.count == 0  # b has no figures: not evicted as if idle


def test_young_replicas_do_not_retire() -> None:
    moves = Mesh(FOUR, ready("a", "w1", "w2", since=YOUNG)).decide([decl("a")],
                                                                    {"a": idle("a")}, EARLY)
    assert moves.count == 0 and "younger than 300 s" in moves.blocked_reason(ModelId("a"))


def test_a_model_that_grew_does_not_shrink_during_the_cooldown() -> None:
    mesh = Mesh(FOUR, ready("a", "w1", "w2"), last_grew_s={ModelId("a"): NOW - 5})
    assert mesh.decide([decl("a")], {"a": busy("a", 2.0)}).count == 2  # growing on is fine
    moves = mesh.decide([decl("a")], {"a": idle("a")}, EARLY)
    assert moves.count == 0 and "grew 5 s ago" in moves.blocked_reason(ModelId("a"))
    mesh.now_s += POLICY.cooldown_s
    assert mesh.decide([decl("a")], {"a": idle("a")}, EARLY).count == 2


def test_a_model_that_shrank_does_not_grow_during_the_cooldown() -> None:
    mesh = Mesh(FOUR, ready("a", "w1"), last_shrank_s={ModelId("a"): NOW - 5})
    moves = mesh.decide([decl("a")], {"a": busy("a", 2.0)})
    assert moves.count == 0 and "shrank 5 s ago" in moves.blocked_reason(ModelId("a"))
    mesh.held = []  # with no replica left, a cold start does not wait
    assert mesh.decide([decl("a")], {"a": busy("a", 2.0)}).count > 0


def test_a_model_goes_to_zero_only_after_a_long_idle() -> None:
    mesh = Mesh(FOUR, ready("a", "w1", "w2"))
    quiet = ModelDemand(ModelId("a"), idle_s=90.0)
    assert mesh.decide([decl("a")], {"a": quiet}).count == 0
    assert retires(mesh.decide([decl("a")], {"a": quiet}, EARLY)) == [("a", "w1")]
    long_quiet = dataclasses.replace(quiet, idle_s=POLICY.idle_to_zero_s)
    assert mesh.decide([decl("a")], {"a": long_quiet}, EARLY).count == 2


def test_a_rise_in_the_last_seconds_counts_and_noise_does_not() -> None:
    mesh = Mesh({f"w{i}": 100 for i in range(8)}, ready("a", "w0"))
    base = busy("a", 0.5, rps=1.0)  # 1 request/s holding a slot 0.5 s: half a replica
    lucky = dataclasses.replace(base, recent_requests_per_s=1.5)
    assert mesh.decide([decl("a")], {"a": lucky}).count == 0
    surge = dataclasses.replace(base, recent_requests_per_s=6.0)
    assert len(mesh.decide([decl("a")], {"a": surge}).adds) == 4  # 3 replicas' worth


def run_trace(mesh: Mesh, loads: Sequence[float], policy: RebalancePolicy = POLICY,
              step_s: float = 10.0) -> list[int]:
    """Moves per round for model "a" under `loads`, every move applied and loaded in a step."""
    counts = []
    for load in loads:
        result = mesh.decide([decl("a")], {"a": busy("a", load)}, policy)
        counts.append(result.count)
        mesh.apply(result)
        mesh.finish_loading(mesh.now_s + step_s)
    return counts


@pytest.mark.parametrize(("start", "low", "high"), [
    ("w0", 0.75, 0.85),      # swinging around add_above on one replica
    ("w0 w1", 0.45, 0.55),   # swinging around retire_below on two
], ids=["around the add threshold", "around the retire threshold"])
def test_oscillating_load_does_not_flap(start: str, low: float, high: float) -> None:
    """An hour of load swinging across a threshold every round: one move, then none."""
    mesh = Mesh({f"w{i}": 100 for i in range(6)}, ready("a", *start.split()))
    counts = run_trace(mesh, [high if i % 2 == 0 else low for i in range(360)], EARLY)
    assert sum(counts) == 1


def test_a_burst_grows_in_one_round_and_shrinks_once_replicas_are_old_enough() -> None:
    mesh = Mesh({f"w{i}": 100 for i in range(8)}, ready("a", "w0"))
    counts = run_trace(mesh, [4.0 if 10 <= i < 40 else 0.3 for i in range(120)], EARLY)
    moved = [i for i, c in enumerate(counts) if c]
    assert counts[10] == 6 and moved[0] == 10 and all(i >= 40 for i in moved[1:])
    assert sum(counts) == 12 and len(mesh.held) == 1


def test_after_a_burst_the_replicas_stay_until_the_memory_is_wanted() -> None:
    mesh = Mesh({f"w{i}": 100 for i in range(8)}, ready("a", "w0"))
    counts = run_trace(mesh, [4.0 if 10 <= i < 40 else 0.3 for i in range(120)])
    assert sum(counts) == 6 and len(mesh.held) == 7
    demand = {"a": busy("a", 0.3), "b": busy("b", 0.5)}
    moves = mesh.decide([decl("a"), decl("b")], demand)
    assert adds(moves) == [("b", "w7")] and retires(moves) == []  # w7 is still free
    mesh.budgets.pop("w7")
    moves = mesh.decide([decl("a"), decl("b")], demand)
    assert retires(moves) == [("a", "w0")] and adds(moves) == [("b", "w0")]


def test_deterministic_under_input_order() -> None:
    models = [decl("a", prio=1), decl("b"), decl("c")]
    mesh = Mesh({f"w{i}": 100 for i in range(5)}, ready("a", "w0") + ready("b", "w1", "w2"))
    demand = {"a": busy("a", 3.0), "b": busy("b", 0.1)}
    first = mesh.decide(models, demand)
    mesh.held.reverse()
    assert mesh.decide(list(reversed(models)), demand) == first


def test_a_short_window_never_retires() -> None:
    """A gateway that just started knows too little to call a model cold."""
    mesh = Mesh(FOUR, ready("a", "w1", "w2"))
    short = {"a": dataclasses.replace(busy("a", 0.1), window_s=5.0)}
    assert mesh.decide([decl("a")], short).count == 0
    assert mesh.decide([decl("a")], {"a": ModelDemand(ModelId("a"), window_s=5.0)}).count == 0
    assert mesh.decide([decl("a")], {"a": busy("a", 0.1)}, EARLY).count == 1


def test_a_backlog_does_not_size_the_model() -> None:
    """Requests queued while the first replica loaded: hot, but sized by arrivals."""
    mesh = Mesh({f"w{i}": 100 for i in range(8)}, ready("a", "w0"))
    moves = mesh.decide([decl("a")], {"a": busy("a", 0.9, mean_queue_wait_s=40.0)})
    assert len(moves.adds) == 1


def test_retiring_early_shrinks_a_cold_model_to_its_target() -> None:
    mesh = Mesh(FOUR, ready("a", "w1", "w2", "w3"))
    moves = mesh.decide([decl("a")], {"a": busy("a", 0.3)}, EARLY)
    assert retires(moves) == [("a", "w1"), ("a", "w2")] and adds(moves) == []


def test_bad_thresholds_and_bounds_are_refused() -> None:
    with pytest.raises(ConfigError):
        RebalancePolicy(add_above=0.5, target=0.6)
    with pytest.raises(ConfigError):
        decl("a", lo=3, hi=2)


def test_retiring_replicas_hold_memory_but_not_capacity() -> None:
    mesh = Mesh({"w1": 100, "w2": 100}, ready("a", "w1") + ready("b", "w2", phase=RETIRING))
    moves = mesh.decide([decl("a"), decl("b")], {"a": busy("a", 0.9)})
    assert moves.count == 0 and "no replica of a colder" in moves.blocked_reason(ModelId("a"))


def random_mesh(rng: random.Random) -> tuple[list[SizedModel], Mesh,
                                             dict[str, ModelDemand]]:
    models = []
    for i in range(rng.randint(1, 4)):
        lo = rng.choice((0, 0, 1, 2))
        models.append(decl(f"m{i}", rng.choice((50, 100, 150)), lo,
                           rng.choice((None, lo, lo + 1, lo + 3)), rng.choice((0, 0, 1))))
    mesh = Mesh({f"w{i}": rng.choice((100, 200, 300)) for i in range(rng.randint(1, 8))},
                leaving={f"w{i}" for i in range(8) if rng.random() < 0.1},
                max_models=rng.choice((0, 0, 2)), last_grew_s={
                    m.model_id: NOW - rng.choice((5, 500)) for m in models if rng.random() < .3})
    for worker, budget in mesh.budgets.items():
        for m in rng.sample(models, len(models)):
            room = budget - sum(next(d.replica_bytes for d in models if d.model_id == r.model_id)
                                for r in mesh.held if r.worker_id == worker) // MiB
            if m.replica_bytes // MiB <= room and rng.random() < 0.5:
                mesh.held += ready(m.model_id, worker, since=rng.choice((OLD, YOUNG)),
                                   phase=rng.choice((READY, READY, LOADING)))
    demand = {str(m.model_id): rng.choice((idle(m.model_id), busy(m.model_id, rng.random() * 4),
                                      busy(m.model_id, 0.2)))
              for m in models if rng.random() < 0.9}
    return models, mesh, demand


def check_invariants(models: list[SizedModel], before: Mesh, after: Mesh,
                     moves: Moves, demand: Mapping[str, ModelDemand]) -> None:
    sizes = {m.model_id: m.replica_bytes for m in models}
    for worker, budget in after.budgets.items():
        here = [r.model_id for r in after.held if r.worker_id == worker]
        assert len(here) == len(set(here)), f"{worker} holds a model twice"
        assert sum(sizes[m] for m in here) <= budget * MiB, f"{worker} over its memory"
    assert not {a.worker_id for a in moves.adds} & before.leaving
    for m in models:
        have = [r for r in after.held if r.model_id == m.model_id
                and r.worker_id not in after.leaving]
        if m.max_replicas is not None:
            assert len(have) <= max(m.max_replicas, len(
                [r for r in before.held if r.model_id == m.model_id])), m.model_id
        was_ready = [r for r in before.held if r.model_id == m.model_id and r.phase is READY
                     and r.worker_id not in before.leaving]
        parked = m.max_replicas == 0  # the user asked for none
        if was_ready and not parked and demand.get(m.model_id, idle(m.model_id)).requests > 0:
            assert any(r.phase is READY for r in have), f"{m.model_id} lost its last ready"


@pytest.mark.parametrize("policy", [POLICY, EARLY], ids=["default", "early"])
def test_random_meshes_keep_the_invariants_and_settle(policy: RebalancePolicy) -> None:
    rng = random.Random(11)
    for _ in range(400):
        models, mesh, demand = random_mesh(rng)
        before = copy.deepcopy(mesh)
        moves = mesh.decide(models, demand, policy)
        mesh.apply(moves)
        check_invariants(models, before, mesh, moves, demand)
        again = mesh.decide(models, demand, policy)
        assert again.count == 0, (before, demand, moves, again)


@pytest.mark.parametrize("policy", [POLICY, EARLY], ids=["default", "early"])
def test_random_meshes_settle_under_steady_demand(policy: RebalancePolicy) -> None:
    """Rounds 30 s apart, loads finishing between them: moves stop, none come back."""
    rng = random.Random(5)
    for _ in range(150):
        models, mesh, demand = random_mesh(rng)
        counts = []
        for _ in range(40):
            before = copy.deepcopy(mesh)
            moves = mesh.decide(models, demand, policy)
            mesh.apply(moves)
            check_invariants(models, before, mesh, moves, demand)
            counts.append(moves.count)
            mesh.finish_loading(mesh.now_s + 30)
        assert sum(counts[20:]) == 0, counts
