"""The planner at scale: `place` and `rebalance` for 1,000 workers and 50 models, seeded.

A rebalancing planner calls `place` for each model's first replica (`max_replicas=1`) and
`rebalance` for the rest; both are timed (best of `--rounds`) against the 100 ms target,
and so is the planner's whole round (`assign.next_placements`: pruning, first replicas,
rebalance, applying the moves, filling free memory). `place` filling every worker
(`max_replicas=0`, the planner before rebalancing) is timed once beside them.

    .venv/bin/python bench/planner_scale.py [--workers 1000] [--models 50] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "common/src"), str(ROOT / "services/planner/src")]
from meshllm.common.types import (  # noqa: E402
    LoadState,
    ModelDeclaration,
    ModelId,
    ModelSpec,
    ModelState,
    Placement,
    WorkerId,
    WorkerInfo,
    whole,
)
from meshllm.planner.assign import RoundInputs, RoundPolicy, next_placements  # noqa: E402
from meshllm.planner.demand import (  # noqa: E402
    CurrentAssignment,
    HeldReplica,
    ModelDemand,
    Moves,
    ReplicaPhase,
    SizedModel,
    WorkerCapacity,
)
from meshllm.planner.place import PlacementPolicy, place  # noqa: E402
from meshllm.planner.rebalance import rebalance  # noqa: E402

GIB = 1 << 30
TARGET_S = 0.100


def best_of(rounds: int, call: Callable[[], object]) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def fleet(n_workers: int, n_models: int,
          rng: random.Random) -> tuple[list[ModelSpec], list[WorkerInfo]]:
    specs = [ModelSpec(ModelId(f"m{i:02d}"), f"m{i:02d}", rng.choice((1, 2, 3, 4, 8)) * GIB,
                       32, 1, 0, "llama", 1) for i in range(n_models)]
    workers = [WorkerInfo(WorkerId(f"w{i:04d}"), "", "cpu", rng.choice((8, 16, 24)) * GIB, 1,
                          0.0) for i in range(n_workers)]
    return specs, workers


def mesh_state(specs: list[ModelSpec], workers: list[WorkerInfo], rng: random.Random,
               now_s: float) -> tuple[list[WorkerCapacity], CurrentAssignment]:
    """Every worker filled with random models while they fit, all ready long ago."""
    held, capacities = [], []
    for worker in workers:
        free = worker.memory_budget_bytes
        for spec in rng.sample(specs, len(specs)):
            if spec.weights_bytes <= free and rng.random() < 0.5:
                free -= spec.weights_bytes
                held.append(HeldReplica(spec.model_id, worker.worker_id, ReplicaPhase.READY,
                                        now_s - 3600))
        capacities.append(WorkerCapacity(worker.worker_id, free))
    return capacities, CurrentAssignment(now_s, tuple(held))


def demand(specs: list[ModelSpec], current: CurrentAssignment, rng: random.Random,
           shares: tuple[float, ...]) -> dict[ModelId, ModelDemand]:
    """Each model's load: its replica count times one of `shares` (utilization)."""
    counts = {s.model_id: 0 for s in specs}
    for replica in current.replicas:
        counts[replica.model_id] += 1
    out = {}
    for spec in specs:
        load = counts[spec.model_id] * rng.choice(shares)
        out[spec.model_id] = ModelDemand(spec.model_id, 60.0, load, mean_service_s=1.0)
    return out


SCENARIOS = {  # name: utilizations the models' loads are drawn from
    "a third of the models hot (2x), a third cold, a third idle": (2.0, 0.1, 0.0),
    "steady (every model inside the dead band)": (0.5,),
}


def time_rebalance(rounds: int, declared: list[SizedModel],
                   capacities: list[WorkerCapacity], wanted: dict[ModelId, ModelDemand],
                   current: CurrentAssignment) -> tuple[float, Moves]:
    answers: list[Moves] = []
    seconds = best_of(rounds, lambda: answers.append(
        rebalance(declared, capacities, wanted, current)))
    return seconds, answers[0]


def round_inputs(specs: list[ModelSpec], workers: list[WorkerInfo],
                 current: CurrentAssignment, wanted: dict[ModelId, ModelDemand]
                 ) -> RoundInputs:
    """The same mesh as the planner's round sees it: placements and workers' states."""
    hosts: dict[ModelId, list[WorkerId]] = {s.model_id: [] for s in specs}
    states: dict[WorkerId, list[ModelState]] = {w.worker_id: [] for w in workers}
    for held in current.replicas:
        hosts[held.model_id].append(held.worker_id)
        states[held.worker_id].append(ModelState(held.model_id, LoadState.READY))
    by_id = {s.model_id: s for s in specs}
    placements = {m: Placement(m, tuple(whole(w, by_id[m].n_layers) for w in ws), 0)
                  for m, ws in hosts.items()}
    return RoundInputs(
        specs=by_id, declarations={s.model_id: ModelDeclaration(s.model_id, s.source)
                                   for s in specs},
        workers={w.worker_id: dataclasses.replace(w, models=tuple(states[w.worker_id]))
                 for w in workers},
        published=placements, demand=wanted, now_s=current.now_s,
        since_s={(h.model_id, h.worker_id): (h.phase, h.since_s) for h in current.replicas})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--models", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    args, _ = ap.parse_known_args()
    rng = random.Random(16)
    specs, workers = fleet(args.workers, args.models, rng)
    first = PlacementPolicy(engine_overhead_bytes=0, max_replicas=1)
    place_s = best_of(args.rounds, lambda: place(specs, workers, policy=first))
    capacities, current = mesh_state(specs, workers, rng, 10_000.0)
    declared = [SizedModel(s.model_id, s.weights_bytes) for s in specs]
    print(f"{args.workers} workers, {args.models} models, {len(current.replicas)} replicas "
          f"held; place (first replicas) {place_s * 1000:.1f} ms")
    for name, shares in SCENARIOS.items():
        wanted = demand(specs, current, rng, shares)
        rebalance_s, moves = time_rebalance(args.rounds, declared, capacities, wanted, current)
        total = place_s + rebalance_s
        print(f"  {name}: {len(moves.adds)} adds, {len(moves.retires)} retires, "
              f"{len(moves.blocked)} blocked; rebalance {rebalance_s * 1000:.1f} ms, "
              f"place + rebalance {total * 1000:.1f} ms = {total / TARGET_S:.2f}x the "
              f"{TARGET_S * 1000:.0f} ms target")
        given = round_inputs(specs, workers, current, wanted)
        policy = RoundPolicy(PlacementPolicy(engine_overhead_bytes=0))
        round_s = best_of(args.rounds, functools.partial(next_placements, given, policy))
        print(f"    the planner's whole round: {round_s * 1000:.1f} ms = "
              f"{round_s / TARGET_S:.2f}x the target")
    full_s = best_of(1, lambda: place(specs, workers,
                                      policy=PlacementPolicy(engine_overhead_bytes=0)))
    print(f"place filling every worker (max_replicas=0): {full_s * 1000:.0f} ms "
          f"({full_s / TARGET_S:.1f}x the target)")


if __name__ == "__main__":
    main()
