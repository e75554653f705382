"""Choosing a worker for a request: a pure function of the mesh and what we measured."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from meshllm.common.meshview import MeshSnapshot
from meshllm.common.types import LoadState, ModelId, WorkerId, WorkerInfo

FAILURE_MEMORY_S = 30.0  # a worker that failed recently is tried after the others


@dataclass(frozen=True)
class WorkerLoad:
    in_flight: int = 0               # requests this gateway has open on the worker
    last_failure_at_s: float = -1e9  # monotonic time of the last failed call


def ready_replicas(snapshot: MeshSnapshot, model_id: ModelId,
                   whole_only: bool = False) -> list[WorkerInfo]:
    """Heads of the model's replicas that report it loaded (a split replica's head is
    ready only once its engine runs with every stage); with `whole_only`, of the replicas
    held whole by one worker only."""
    placement = snapshot.placements.get(model_id)
    if placement is None:
        return []
    replicas = []
    for replica in placement.replicas:
        if whole_only and replica.is_split:
            continue
        worker_id = replica.head.worker_id
        worker = snapshot.workers.get(worker_id)
        state = worker.model_state(model_id) if worker else None
        if worker is not None and state is not None and state.state is LoadState.READY:
            replicas.append(worker)
    return replicas


def serves_embeddings(snapshot: MeshSnapshot, model_id: ModelId) -> bool:
    """Whether a model serves embeddings: every model held whole somewhere does (mean
    pooling on a context of its own); a model only split across workers does not. Before
    it is placed: unless it is to be split."""
    placement = snapshot.placements.get(model_id)
    if placement is None or not placement.replicas:
        spec = snapshot.models.get(model_id)
        return spec is not None and not spec.force_split
    return any(not r.is_split for r in placement.replicas)


def route(replicas: list[WorkerInfo], loads: Mapping[WorkerId, WorkerLoad],
          now_s: float) -> list[WorkerInfo]:
    """Replicas in the order to try them: healthy before recently failed, then least
    busy first, ties broken by id so that equal loads spread deterministically."""

    def key(worker: WorkerInfo) -> tuple[bool, int, str]:
        load = loads.get(worker.worker_id, WorkerLoad())
        failed_recently = now_s - load.last_failure_at_s < FAILURE_MEMORY_S
        return failed_recently, load.in_flight, worker.worker_id

    return sorted(replicas, key=key)


def why_unavailable(snapshot: MeshSnapshot, model_id: ModelId) -> str:
    """A plain sentence for a 503: what the mesh is doing about this model."""
    placement = snapshot.placements.get(model_id)
    if placement is None:
        return f"model {model_id} has not been placed yet: is the planner running?"
    if placement.unplaced_reason:
        return f"model {model_id} cannot be served: {placement.unplaced_reason}"
    states = []
    for worker_id in placement.head_ids:
        worker = snapshot.workers.get(worker_id)
        state = worker.model_state(model_id) if worker else None
        states.append(f"{worker_id}: {state.state.value if state else 'not reporting'}"
                      + (f" ({state.error})" if state and state.error else ""))
    return f"no live worker serves {model_id} right now ({'; '.join(states)}); retry shortly"
