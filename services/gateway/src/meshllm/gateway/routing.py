"""Choosing a worker for a request: a pure function of the mesh and what we measured
(each worker's ban and load, and which replica holds a prompt's prefix)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from meshllm.common.meshview import MeshSnapshot
from meshllm.common.replicas import ready_replicas as ready_replicas
from meshllm.common.replicas import serves_embeddings as serves_embeddings
from meshllm.common.types import LoadState, ModelId, WorkerId, WorkerInfo
from meshllm.gateway.affinity import longest_match
from meshllm.gateway.bans import Health, health
from meshllm.gateway.bans import WorkerLoad as WorkerLoad
from meshllm.gateway.sessions import rendezvous, session_of

AFFINITY_MAX_EXTRA_LOAD = 2  # a prefix's replica is skipped when busier than the least by more


@dataclass(frozen=True)
class RequestKey:
    """What routing knows of a request: its model, its prompt's prefix keys and its
    session."""

    model_id: ModelId
    prefixes: tuple[int, ...] = ()  # affinity.prefix_keys: shortest prefix first
    session: int = 0                # sessions.session_key (0: none; or carried by
                                    # prefixes as sessions.RouteKeys)

    @property
    def session_key(self) -> int:
        return self.session or session_of(self.prefixes)


@dataclass(frozen=True)
class RouteStats:
    """What this gateway measured: each worker's record, and which replica last served
    each prompt prefix."""

    loads: Mapping[WorkerId, WorkerLoad] = field(default_factory=dict)
    prefixes: Mapping[int, WorkerId] = field(default_factory=dict)


class Affinity(enum.Enum):
    NONE = "none"  # the prompt has no prefix key
    HIT = "hit"    # sent back to the replica that served its prefix
    MISS = "miss"  # no replica serving now is known to hold its prefix
    BUSY = "busy"  # its replica was banned or much busier than the least busy one
    SESSION = "session"  # a named session: to its replica by rendezvous hash


@dataclass(frozen=True)
class Decision:
    order: tuple[WorkerInfo, ...]  # replicas in the order to try them
    affinity: Affinity
    matched: int = 0               # prefix keys the chosen replica is known to hold


def worker_load(worker: WorkerInfo, model_id: ModelId, state: WorkerLoad) -> int:
    """Requests ahead of a new one: the worker's own running + queued, or this gateway's
    calls in flight when more (the worker's report lags; it counts ours too, when fresh)."""
    model = worker.model_state(model_id)
    reported = model.running + model.queued if model else 0
    return max(state.in_flight, reported)


def _full(worker: WorkerInfo, model_id: ModelId, load: int) -> bool:
    """Whether a new request would wait for a slot (unknown slots: never full)."""
    model = worker.model_state(model_id)
    return bool(model and model.slots and load >= model.slots)


def _rank(key: RequestKey, stats: RouteStats, now_s: float
          ) -> Callable[[WorkerInfo], tuple[bool, bool, int, str]]:
    def rank(worker: WorkerInfo) -> tuple[bool, bool, int, str]:
        state = stats.loads.get(worker.worker_id, WorkerLoad())
        load = worker_load(worker, key.model_id, state)
        banned = health(state, now_s) is Health.BANNED
        return banned, _full(worker, key.model_id, load), load, worker.worker_id
    return rank


def decide(key: RequestKey, replicas: Sequence[WorkerInfo], stats: RouteStats,
           now_s: float) -> Decision:
    """Replicas in the order to try them: not banned first, then those with a free slot,
    then least busy, ties by id so that equal loads spread deterministically; and first
    of all the replica that served this prompt's longest known prefix, unless it is
    banned or busier than the least busy by more than AFFINITY_MAX_EXTRA_LOAD. A request
    of a named session goes by the session instead (`_by_session`)."""
    rank = _rank(key, stats, now_s)
    ranked = tuple(sorted(replicas, key=rank))
    if key.session_key:
        return _by_session(key.session_key, ranked, rank)
    target, depth = longest_match(key.prefixes, stats.prefixes)
    chosen = next((w for w in ranked if w.worker_id == target), None)
    if chosen is None:
        return Decision(ranked, Affinity.MISS if key.prefixes else Affinity.NONE)
    banned, _, load, _ = rank(chosen)
    least = min(r[2] for r in map(rank, ranked) if not r[0])  # chosen is one of them
    if banned or load > least + AFFINITY_MAX_EXTRA_LOAD:
        return Decision(ranked, Affinity.BUSY)
    rest = tuple(w for w in ranked if w is not chosen)
    return Decision((chosen, *rest), Affinity.HIT, depth)


def _by_session(session: int, ranked: Sequence[WorkerInfo],
                rank: Callable[[WorkerInfo], tuple[bool, bool, int, str]]) -> Decision:
    """A named session's replicas in its rendezvous order, banned ones last: it sticks to
    its replica, and when that one fails or goes, moves to the same next one from every
    gateway; load does not move it (its KV cache is there)."""
    ordered = sorted(rendezvous(session, ranked), key=lambda w: rank(w)[0])
    return Decision(tuple(ordered), Affinity.SESSION)


def route(key: RequestKey, replicas: Sequence[WorkerInfo], stats: RouteStats,
          now_s: float) -> list[WorkerInfo]:
    """The order of `decide`, for callers that need no more."""
    return list(decide(key, replicas, stats, now_s).order)


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
