"""The working copy one `rebalance` call edits as it decides: what each worker and model
holds after the moves decided so far. Private to `rebalance`; nothing here outlives a call."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from meshllm.common.types import ModelId, WorkerId
from meshllm.planner.demand import (
    AddReplica,
    Blocked,
    CurrentAssignment,
    HeldReplica,
    Moves,
    RebalancePolicy,
    ReplicaPhase,
    RetireReplica,
    SizedModel,
    WorkerCapacity,
)


@dataclass
class PlannedWorker:
    info: WorkerCapacity
    free: int      # bytes free once the retires decided here have unloaded
    free_now: int  # bytes free before any of them has
    held: set[ModelId] = field(default_factory=set)   # models with a replica here, any phase
    count: int = 0  # replicas that count toward max_models (retiring ones do not)
    pending: list[ModelId] = field(default_factory=list)  # retiring here, this call

    @property
    def worker_id(self) -> WorkerId:
        return self.info.worker_id

    def can_take(self, model_id: ModelId, evicting: int) -> bool:
        """Whether a replica of `model_id` may go here once `evicting` replicas leave."""
        if self.info.leaving or model_id in self.held:
            return False
        return self.info.max_models == 0 or self.count - evicting < self.info.max_models


class FreeIndex:
    """Workers that may take a replica, by replica count and then free bytes, so the best
    worker for an add is found without scanning the whole fleet at each add."""

    def __init__(self) -> None:
        self._by_count: dict[int, list[tuple[int, WorkerId]]] = {}

    def put(self, worker: PlannedWorker) -> None:
        cap = worker.info.max_models
        if not worker.info.leaving and (cap == 0 or worker.count < cap):
            bisect.insort(self._by_count.setdefault(worker.count, []),
                          (worker.free, worker.worker_id))

    def drop(self, worker: PlannedWorker) -> None:
        entries = self._by_count.get(worker.count, [])
        i = bisect.bisect_left(entries, (worker.free, worker.worker_id))
        if i < len(entries) and entries[i] == (worker.free, worker.worker_id):
            del entries[i]

    def best(self, model_id: ModelId, need: int,
             workers: Mapping[WorkerId, PlannedWorker]) -> PlannedWorker | None:
        """Fewest replicas first, then the tightest fit, then id."""
        for count in sorted(self._by_count):
            entries = self._by_count[count]
            for i in range(bisect.bisect_left(entries, (need, WorkerId(""))), len(entries)):
                worker = workers[entries[i][1]]
                if model_id not in worker.held:
                    return worker
        return None


@dataclass
class PlannedModel:
    decl: SizedModel
    staying: list[HeldReplica] = field(default_factory=list)  # ready or loading, not leaving
    ready: int = 0    # ready replicas on workers that stay
    added: int = 0
    want: int = 0  # within min and max replicas
    why: str = ""
    load: float = 0.0  # replicas' worth of work (ModelDemand.offered_load)
    measured: bool = False  # its demand window is long enough to call it cold

    @property
    def model_id(self) -> ModelId:
        return self.decl.model_id

    @property
    def have(self) -> int:
        return len(self.staying) + self.added

    @property
    def projected_util(self) -> float:
        """Utilization once the replicas added so far are ready."""
        return self.load / self.have if self.have else math.inf

    @property
    def util_after_giving(self) -> float:
        """Utilization with one ready replica fewer (an idle model may give its last)."""
        if self.load <= 0:
            return 0.0
        return self.load / (self.have - 1) if self.have > 1 else math.inf


@dataclass
class Plan:
    policy: RebalancePolicy
    current: CurrentAssignment
    workers: dict[WorkerId, PlannedWorker]
    models: dict[ModelId, PlannedModel]
    free_index: FreeIndex = field(default_factory=FreeIndex)
    adds: list[AddReplica] = field(default_factory=list)
    retires: list[RetireReplica] = field(default_factory=list)
    blocked: list[Blocked] = field(default_factory=list)

    @classmethod
    def start(cls, models: Sequence[SizedModel], workers: Sequence[WorkerCapacity],
              current: CurrentAssignment, policy: RebalancePolicy) -> Plan:
        planned_workers = {w.worker_id: PlannedWorker(w, w.free_bytes, w.free_bytes)
                           for w in sorted(workers, key=lambda w: w.worker_id)}
        planned_models = {m.model_id: PlannedModel(m)
                          for m in sorted(models, key=lambda m: m.model_id)}
        plan = cls(policy, current, planned_workers, planned_models)
        plan._hold(current.replicas)
        for worker in planned_workers.values():
            plan.free_index.put(worker)
        return plan

    def _hold(self, replicas: Iterable[HeldReplica]) -> None:
        for held in sorted(replicas, key=lambda r: (r.model_id, r.worker_id)):
            worker = self.workers.get(held.worker_id)
            if worker is None:
                continue  # gone: nothing of it serves or takes memory any more
            worker.held.add(held.model_id)
            model = self.models.get(held.model_id)
            if held.phase is ReplicaPhase.RETIRING:
                continue
            worker.count += 1
            if model is None:
                continue
            if not worker.info.leaving:
                model.staying.append(held)
                model.ready += held.phase is ReplicaPhase.READY

    @property
    def now_s(self) -> float:
        return self.current.now_s

    def by_priority(self) -> list[PlannedModel]:
        return sorted(self.models.values(), key=lambda m: (-m.decl.priority, m.model_id))

    def retire(self, held: HeldReplica, freed_bytes: int, reason: str) -> None:
        self.retires.append(RetireReplica(held.model_id, held.worker_id, reason))
        worker = self.workers[held.worker_id]
        self.free_index.drop(worker)
        worker.free += freed_bytes
        worker.count -= 1
        worker.pending.append(held.model_id)
        self.free_index.put(worker)
        model = self.models.get(held.model_id)
        if model is not None and held in model.staying:
            model.staying.remove(held)
            if held.phase is ReplicaPhase.READY:
                model.ready -= 1

    def add(self, model: PlannedModel, worker: PlannedWorker, reason: str) -> None:
        need = model.decl.replica_bytes
        after = tuple(worker.pending) if worker.free_now < need else ()
        self.adds.append(AddReplica(model.model_id, worker.worker_id, reason, after))
        self.free_index.drop(worker)
        worker.free -= need
        worker.free_now -= need
        worker.held.add(model.model_id)
        worker.count += 1
        self.free_index.put(worker)
        model.added += 1

    def block(self, model: PlannedModel, reason: str) -> None:
        self.blocked.append(Blocked(model.model_id, reason))

    def moves(self) -> Moves:
        return Moves(tuple(self.adds), tuple(self.retires), tuple(self.blocked))
