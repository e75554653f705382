"""The simulated mesh for bench/rebalance_sim.py: workers, the replicas they hold, and
per-second queue statistics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from meshllm.common.types import ModelId, ModelSpec, WorkerId, WorkerInfo
from meshllm.planner.place import PlacementPolicy, place

GIB = 1 << 30


@dataclass(frozen=True)
class SimConfig:
    workers: int = 50
    worker_gib: int = 4           # each worker's memory budget
    hours: float = 2.0
    seed: int = 7
    replica_rps: float = 2.0      # requests/s one ready replica serves
    slots: int = 4                # sequences a replica runs at once
    load_s: float = 60.0          # a replica takes this long to load
    drain_s: float = 10.0         # a retiring replica's streams take this long to finish
    queue_timeout_s: float = 30.0  # a queued request is refused after this
    cold_timeout_s: float = 120.0  # ... or this while its model has no ready replica
    waited_s: float = 1.0         # a request "waited" when its queue wait is over this
    window_s: float = 60.0        # the demand window
    start: str = "full"           # full: place() fills memory; sparse: one replica each


@dataclass(frozen=True)
class TickStats:
    """One model's second."""

    arrived: int
    served: int
    refused: int
    waited: int
    wait_sum_s: float


@dataclass
class SimReplica:
    model: str
    worker: int
    started_s: float
    ready_s: float


@dataclass
class Cluster:
    budgets: list[int]
    sizes: Mapping[str, int]
    replicas: list[SimReplica] = field(default_factory=list)

    def free(self, worker: int) -> int:
        return self.budgets[worker] - sum(self.sizes[r.model] for r in self.replicas
                                          if r.worker == worker)

    def held(self, model: str) -> list[SimReplica]:
        return [r for r in self.replicas if r.model == model]

    def ready(self, model: str, t: float) -> int:
        return sum(1 for r in self.replicas if r.model == model and r.ready_s <= t)

    def add(self, model: str, worker: int, t: float, load_s: float) -> None:
        self.replicas.append(SimReplica(model, worker, t, t + load_s))

    def remove(self, model: str, worker: int) -> None:
        self.replicas = [r for r in self.replicas if (r.model, r.worker) != (model, worker)]


def initial_cluster(cfg: SimConfig, sizes: Mapping[str, int]) -> Cluster:
    """What `place()` gives, all ready long ago: replicas round-robin until memory is full,
    or one per model (`start="sparse"`)."""
    specs = [ModelSpec(ModelId(name), name, size, 24, 1, 0, "llama", 1)
             for name, size in sizes.items()]
    workers = [WorkerInfo(WorkerId(f"w{i:02d}"), "", "cpu", cfg.worker_gib * GIB, 1, 0.0)
               for i in range(cfg.workers)]
    cap = 1 if cfg.start == "sparse" else 0
    placed = place(specs, workers, policy=PlacementPolicy(engine_overhead_bytes=0,
                                                          max_replicas=cap))
    cluster = Cluster([cfg.worker_gib * GIB] * cfg.workers, sizes)
    for model_id, placement in placed.items():
        for worker_id in placement.head_ids:
            cluster.replicas.append(SimReplica(model_id, int(worker_id[1:]), -7200, -7200))
    return cluster
