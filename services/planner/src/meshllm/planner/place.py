"""Placement as a pure function of the wanted models and the live workers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshllm.common.config import format_size
from meshllm.common.types import Assignment, ModelId, ModelSpec, Placement, WorkerId, WorkerInfo

MiB = 1024 * 1024


@dataclass(frozen=True)
class PlacementPolicy:
    engine_overhead_bytes: int = 96 * MiB  # compute buffers and runtime beside weights and KV
    max_replicas: int = 0                  # 0: as many as fit


def required_bytes(model: ModelSpec, policy: PlacementPolicy) -> int:
    return model.weights_bytes + model.kv_cache_bytes + policy.engine_overhead_bytes


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
    largest = max(w.memory_budget_bytes for w in workers)
    if largest < required_bytes(model, policy):
        return f"{need}, but the largest worker budget is {format_size(largest)}"
    return f"{need}, but other models use the workers' memory: most free is " \
           f"{format_size(max(free.values()))}"


def _candidates(model: ModelSpec, need: int, free: Mapping[WorkerId, int],
                taken: Sequence[WorkerId], previous: Placement | None) -> list[WorkerId]:
    """Workers that fit the model: its previous hosts first (no needless reloads), then
    the one with the most free memory, ties broken by id so the result is deterministic."""
    held = set(previous.worker_ids) if previous else set()
    fits = [w for w, f in free.items() if f >= need and w not in taken]
    return sorted(fits, key=lambda w: (w not in held, -free[w], w))


def place(models: Sequence[ModelSpec], workers: Sequence[WorkerInfo],
          previous: Mapping[ModelId, Placement] | None = None,
          policy: PlacementPolicy | None = None) -> dict[ModelId, Placement]:
    """Each model goes whole onto workers whose free memory fits it.

    Every model first gets one replica (largest models choose first); then replicas are
    added round-robin while memory remains, up to `policy.max_replicas`.
    """
    policy = policy or PlacementPolicy()
    previous = previous or {}
    free: dict[WorkerId, int] = {w.worker_id: w.memory_budget_bytes for w in workers}
    hosts: dict[ModelId, list[WorkerId]] = {m.model_id: [] for m in models}
    order = sorted(models, key=lambda m: (-required_bytes(m, policy), m.model_id))
    unplaced: dict[ModelId, str] = {}
    growing = True
    while growing:
        growing = False
        for model in order:
            taken = hosts[model.model_id]
            if policy.max_replicas and len(taken) >= policy.max_replicas:
                continue
            need = required_bytes(model, policy)
            choice = _candidates(model, need, free, taken, previous.get(model.model_id))
            if not choice:
                if not taken and model.model_id not in unplaced:
                    unplaced[model.model_id] = _explain(model, policy, workers, free)
                continue
            taken.append(choice[0])
            free[choice[0]] -= need
            growing = True
    return {
        m.model_id: Placement(
            m.model_id,
            tuple(Assignment(w, 0, m.n_layers) for w in sorted(hosts[m.model_id])),
            required_bytes(m, policy), unplaced.get(m.model_id, ""),
        )
        for m in models
    }
