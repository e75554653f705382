"""Choosing a worker for a request: a pure function of the mesh and what we measured."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from meshllm.common.meshview import MeshSnapshot
from meshllm.common.replicas import ready_replicas as ready_replicas
from meshllm.common.replicas import serves_embeddings as serves_embeddings
from meshllm.common.types import LoadState, ModelId, WorkerId, WorkerInfo

FAILURE_MEMORY_S = 30.0  # a worker that failed recently is tried after the others


@dataclass(frozen=True)
class WorkerLoad:
    in_flight: int = 0               # requests this gateway has open on the worker
    last_failure_at_s: float = -1e9  # monotonic time of the last failed call


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


class Serving(enum.Enum):
    """Where a declared model stands, as `GET /api/models` and `/v1/models` show it."""

    WAITING = "waiting"        # declared, not placed yet (the planner is reading it)
    LOADING = "loading"        # placed, no replica ready yet
    SERVING = "serving"        # a replica is ready
    NOT_SERVED = "not_served"  # it fits nowhere, cannot be read, or every replica failed

    @property
    def coming(self) -> bool:
        """Whether a replica may yet come up without anyone acting (a request waits)."""
        return self in (Serving.WAITING, Serving.LOADING)


def serving_state(snapshot: MeshSnapshot, model_id: ModelId) -> tuple[Serving, str]:
    """The model's state and, unless it serves, why not."""
    if ready_replicas(snapshot, model_id):
        return Serving.SERVING, ""
    placement = snapshot.placements.get(model_id)
    if placement is None or not placement.replicas:
        if placement is not None and placement.unplaced_reason:
            return Serving.NOT_SERVED, placement.unplaced_reason
        return Serving.WAITING, f"model {model_id} is declared and waits to be placed"
    heads = [snapshot.workers.get(w) for w in placement.head_ids]
    states = [h.model_state(model_id) if h else None for h in heads]
    if all(s is not None and s.state is LoadState.FAILED for s in states):
        return Serving.NOT_SERVED, why_unavailable(snapshot, model_id)
    return Serving.LOADING, why_unavailable(snapshot, model_id)
