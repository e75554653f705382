"""Placement as a pure function of the wanted models and the live workers."""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from meshllm.common.config import format_size
from meshllm.common.moe import ExpertRanking
from meshllm.common.types import (
    ExpertDeal,
    ModelId,
    ModelSpec,
    Placement,
    Replica,
    WorkerId,
    WorkerInfo,
    whole,
)
from meshllm.planner.experts import DEFAULT_HOT_SHARE, ShardPlan, plan_shards
from meshllm.planner.experts_redeal import unreadable
from meshllm.planner.split import SplitPolicy, plan_split, stage_bytes

MiB = 1024 * 1024


@dataclass(frozen=True)
class PlacementPolicy:
    engine_overhead_bytes: int = 96 * MiB  # compute buffers and runtime beside weights and KV
    max_replicas: int = 0                  # 0: as many as fit
    stage_overhead_bytes: int = 32 * MiB   # an RPC stage server's buffers
    max_link_rtt_ms: float = 80.0          # never split over a slower link
    expert_hot_share: float = DEFAULT_HOT_SHARE  # of a shard's experts, the most chosen
                                                 # (a fraction, 0..1), on every shard

    @property
    def split(self) -> SplitPolicy:
        return SplitPolicy(self.engine_overhead_bytes, self.stage_overhead_bytes,
                           self.max_link_rtt_ms)


def required_bytes(model: ModelSpec, policy: PlacementPolicy) -> int:
    return model.weights_bytes + model.kv_cache_bytes + policy.engine_overhead_bytes


def slots_that_fit(spec: ModelSpec, free_bytes: int, wanted: int,
                   policy: PlacementPolicy) -> int:
    """The most slots, at most `wanted`, with which the model fits `free_bytes` whole (its
    KV cache is one context per slot); 0 when not even one slot fits."""
    room = free_bytes - spec.weights_bytes - policy.engine_overhead_bytes
    per_slot = spec.kv_slot_bytes
    if room < per_slot or wanted < 1:
        return 0
    return wanted if per_slot == 0 else min(wanted, room // per_slot)


@dataclass(frozen=True)
class SlotSizing:
    spec: ModelSpec  # with the slots it gets
    note: str = ""   # why it got fewer than it asked for ("": as many as asked)


def size_slots(spec: ModelSpec, budgets: Sequence[int], policy: PlacementPolicy
               ) -> SlotSizing:
    """Fewer slots (down to 1) for a model whose KV cache at its asked-for slots fits no
    worker whole, when fewer would fit the largest budget: a whole replica with fewer
    slots beats a split one (RPC per token) or none. A model set to split, one no budget
    holds even with one slot, and one without workers keep the slots they asked for."""
    largest = max(budgets, default=0)
    if spec.force_split or not largest or required_bytes(spec, policy) <= largest:
        return SlotSizing(spec)
    fit = slots_that_fit(spec, largest, spec.slots, policy)
    if fit < 1:
        return SlotSizing(spec)
    note = (f"{fit} of {spec.slots} slots: the KV cache of {spec.slots} x "
            f"{spec.context_length} tokens does not fit the largest worker budget "
            f"({format_size(largest)}) beside {format_size(spec.weights_bytes)} of weights")
    return SlotSizing(dataclasses.replace(spec, slots=fit), note)


def _explain(model: ModelSpec, policy: PlacementPolicy, workers: Sequence[WorkerInfo],
             free: Mapping[WorkerId, int]) -> str:
    need = (
        f"{model.model_id} needs {format_size(required_bytes(model, policy))} "
        f"(weights {format_size(model.weights_bytes)} + KV cache "
        f"{format_size(model.kv_cache_bytes)} for {model.context_length} tokens + "
        f"{format_size(policy.engine_overhead_bytes)} engine overhead)"
    )
    if not workers:
        return f"{need}, but no worker is registered"
    total = sum(free.values())
    if model.force_split and len(workers) < 2:
        return f"{need} and is set to split, but only one worker is registered"
    largest = max(w.memory_budget_bytes for w in workers)
    if _unbuildable(model, workers):
        return f"{need} and fits no worker whole; {unreadable(model, workers)}"
    shards = "" if model.moe is None or model.force_split else (
        f"; {plan_shards(model, free, policy.engine_overhead_bytes)}")
    return (f"{need}, but the largest worker budget is {format_size(largest)} and no split "
            f"over links under {policy.max_link_rtt_ms:g} ms holds it either "
            f"({format_size(total)} free in all){shards}")


def _whole_candidates(need: int, free: Mapping[WorkerId, int], taken: Sequence[WorkerId],
                      previous: Placement | None) -> list[WorkerId]:
    """Workers that fit the model whole: its previous hosts first (no needless reloads),
    then the one with the most free memory, ties broken by id so the result is stable."""
    held = set(previous.head_ids) if previous else set()
    fits = [w for w, f in free.items() if f >= need and w not in taken]
    return sorted(fits, key=lambda w: (w not in held, -free[w], w))


def _shards(model: ModelSpec, free: dict[WorkerId, int], previous: Placement | None,
            policy: PlacementPolicy, ranking: ExpertRanking | None, cap: int
            ) -> ShardPlan | None:
    """Expert shards for a MoE model that fits no worker whole (memory taken from `free`)."""
    if model.moe is None or model.force_split:
        return None
    plan = plan_shards(model, free, policy.engine_overhead_bytes, ranking,
                       policy.expert_hot_share, cap, previous)
    if isinstance(plan, str):
        return None
    for worker, need in plan.bytes_by_worker.items():
        free[worker] -= need
    return plan


def _unbuildable(model: ModelSpec, workers: Iterable[WorkerInfo]) -> bool:
    """A MoE model to be served by expert shards that no worker could build: none can read
    its file, so none can cut a shard or send one (experts_redeal.unreadable)."""
    return model.moe is not None and not model.force_split and bool(unreadable(model, workers))


def _shards_only(model: ModelSpec, free: Mapping[WorkerId, int],
                 policy: PlacementPolicy) -> bool:
    """A MoE model no worker holds whole: its shards take the room left (they shrink to it;
    a whole replica cannot), so it places after the others."""
    return (model.moe is not None and not model.force_split
            and required_bytes(model, policy) > max(free.values(), default=0))


def _place_first(model: ModelSpec, free: dict[WorkerId, int],
                 workers: Mapping[WorkerId, WorkerInfo], previous: Placement | None,
                 policy: PlacementPolicy, ranking: ExpertRanking | None = None, cap: int = 0
                 ) -> Replica | ShardPlan | None:
    """One replica: whole on one worker if possible (unless forced to split), else expert
    shards for a mixture of experts (unless forced to split), else split."""
    need = required_bytes(model, policy)
    if not model.force_split:
        choice = _whole_candidates(need, free, (), previous)
        if choice:
            free[choice[0]] -= need
            return whole(choice[0], model.n_layers)
    if _unbuildable(model, workers.values()):
        # Nothing, not even a layer split: shards nobody can cut would never load, and a
        # split placed while the workers still hash the file would stay a split after.
        return None
    shards = _shards(model, free, previous, policy, ranking, cap)
    if shards is not None:
        return shards
    replica = plan_split(model, free, workers, policy.split)
    if replica is not None:
        for i, stage in enumerate(replica.stages):
            free[stage.worker_id] -= stage_bytes(model, stage, i == 0, policy.split)
    return replica


class FreeHeap:
    """Workers by most free memory, ties by id: the best host for one more replica without
    sorting every worker for every replica (a thousand workers fill in milliseconds)."""

    def __init__(self, free: dict[WorkerId, int]) -> None:
        self.free = free
        self._heap = [(-f, w) for w, f in free.items()]
        heapq.heapify(self._heap)

    def take(self, worker: WorkerId, need: int) -> None:
        self.free[worker] -= need
        heapq.heappush(self._heap, (-self.free[worker], worker))  # the old entry goes stale

    def best(self, need: int, exclude: set[WorkerId]) -> WorkerId | None:
        """The worker with the most free memory, at least `need`, not in `exclude`."""
        skipped, found = [], None
        while self._heap:
            negative, worker = self._heap[0]
            if -negative != self.free[worker]:
                heapq.heappop(self._heap)  # stale: memory was taken since
            elif -negative < need:
                break  # nobody has more
            elif worker in exclude:
                skipped.append(heapq.heappop(self._heap))
            else:
                found = worker
                break
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return found


def _next_host(need: int, heap: FreeHeap, hosts: set[WorkerId],
               previous: Placement | None) -> WorkerId | None:
    """As `_whole_candidates` orders them: a previous host that fits first, then the most
    free memory, ties by id."""
    held = [w for w in (previous.head_ids if previous else ())
            if w not in hosts and heap.free.get(w, 0) >= need]
    if held:
        return min(held, key=lambda w: (-heap.free[w], w))
    return heap.best(need, hosts)


def _grow(order: Sequence[ModelSpec], replicas: dict[ModelId, list[Replica]], heap: FreeHeap,
          previous: Mapping[ModelId, Placement], policy: PlacementPolicy,
          caps: Mapping[ModelId, int]) -> None:
    """More replicas for models served whole, one per model per round, while memory lasts."""
    growing = True
    while growing:
        growing = False
        for model in order:
            taken = replicas[model.model_id]
            cap = caps.get(model.model_id) or policy.max_replicas
            if not taken or taken[0].is_split or taken[0].is_shard or (
                    cap and len(taken) >= cap):
                continue
            need = required_bytes(model, policy)
            hosts = {r.head.worker_id for r in taken}
            choice = _next_host(need, heap, hosts, previous.get(model.model_id))
            if choice is not None:
                taken.append(whole(choice, model.n_layers))
                heap.take(choice, need)
                growing = True


def place(models: Sequence[ModelSpec], workers: Sequence[WorkerInfo],
          previous: Mapping[ModelId, Placement] | None = None,
          policy: PlacementPolicy | None = None,
          max_replicas: Mapping[ModelId, int] | None = None,
          rankings: Mapping[str, ExpertRanking] | None = None,
          max_shards: Mapping[ModelId, int] | None = None) -> dict[ModelId, Placement]:
    """Every model first gets one replica, largest models choosing first (a MoE model
    no worker holds whole last, its shards sized to what is left): whole on one
    worker, or, when none holds it, expert shards of a mixture of experts (one per worker
    that holds one, at most `max_replicas`; ranked by `rankings`, by model digest), else
    split over the fewest workers. Then models served whole get more replicas round-robin
    while memory remains, up to the model's `max_replicas` (as declared; 0 or absent:
    `policy.max_replicas`). `max_shards` caps expert shards apart (default: as replicas)."""
    policy = policy or PlacementPolicy()
    previous, caps, rankings = previous or {}, max_replicas or {}, rankings or {}
    shard_caps = caps if max_shards is None else max_shards
    by_id = {w.worker_id: w for w in workers}
    free: dict[WorkerId, int] = {w.worker_id: w.memory_budget_bytes for w in workers}
    replicas: dict[ModelId, list[Replica]] = {m.model_id: [] for m in models}
    unplaced: dict[ModelId, str] = {}
    deals: dict[ModelId, ExpertDeal] = {}  # of the models served by expert shards
    order = sorted(models, key=lambda m: (_shards_only(m, free, policy),
                                          -required_bytes(m, policy), m.model_id))
    for model in order:
        placed = _place_first(model, free, by_id, previous.get(model.model_id), policy,
                              rankings.get(model.model_digest),
                              shard_caps.get(model.model_id) or policy.max_replicas)
        if placed is None:
            unplaced[model.model_id] = _explain(model, policy, workers, free)
        elif isinstance(placed, ShardPlan):
            replicas[model.model_id], deals[model.model_id] = list(placed.shards), placed.deal
        else:
            replicas[model.model_id].append(placed)
    _grow(order, replicas, FreeHeap(free), previous, policy, caps)
    return {
        m.model_id: Placement(
            m.model_id, tuple(sorted(replicas[m.model_id], key=lambda r: r.head.worker_id)),
            required_bytes(m, policy), unplaced.get(m.model_id, ""), deals.get(m.model_id))
        for m in models
    }
