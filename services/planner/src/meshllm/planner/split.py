"""Splitting one model's layers across workers (pipeline parallelism), as pure functions.

The head holds the embeddings and output layer plus the first layers; each further stage
holds a contiguous range after it. We use the fewest workers that hold the model, prefer
low-latency links to the head, skip links slower than a threshold, and give each worker a
share of layers proportional to the room it has for them.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshllm.common.types import Assignment, ModelSpec, Replica, WorkerId, WorkerInfo

MAX_COMBINATIONS = 20_000  # beyond this, take the greedy choice instead of the best one


@dataclass(frozen=True)
class SplitPolicy:
    engine_overhead_bytes: int   # the head runs a full engine
    stage_overhead_bytes: int    # a stage runs only an RPC server with compute buffers
    max_link_rtt_ms: float       # links slower than this are never used for a split


def layer_cost(model: ModelSpec) -> int:
    """Bytes one layer needs: its weights (the largest layer, to be safe) and its KV cache."""
    largest = max(model.layer_bytes) if model.layer_bytes else model.layer_weight_bytes(0, 1)
    return largest + model.layer_kv_bytes(1)


def layer_room(free: int, fixed: int, model: ModelSpec) -> int:
    return max(0, (free - fixed) // layer_cost(model))


def rtt(workers: Mapping[WorkerId, WorkerInfo], a: WorkerId, b: WorkerId) -> float | None:
    """Round trip between two workers as either measured it; None when unknown."""
    seen = [x for x in (workers[a].rtt_ms.get(b), workers[b].rtt_ms.get(a)) if x is not None]
    return min(seen) if seen else None


def proportional(total: int, rooms: Sequence[int]) -> list[int]:
    """`total` layers in shares proportional to `rooms`, each at least 1 and at most its room.

    Largest-remainder rounding; callers guarantee len(rooms) <= total <= sum(rooms).
    """
    weight = sum(rooms)
    raw = [total * r / weight for r in rooms]
    counts = [min(r, max(1, int(x))) for r, x in zip(rooms, raw, strict=True)]
    while sum(counts) < total:
        i = max((i for i in range(len(rooms)) if counts[i] < rooms[i]),
                key=lambda i: (raw[i] - counts[i], -i))
        counts[i] += 1
    while sum(counts) > total:
        i = min((i for i in range(len(rooms)) if counts[i] > 1),
                key=lambda i: (raw[i] - counts[i], i))
        counts[i] -= 1
    return counts


@dataclass(frozen=True)
class _Choice:
    head: WorkerId
    stages: tuple[WorkerId, ...]
    rooms: tuple[int, ...]
    latency_ms: float


def _stage_sets(model: ModelSpec, head: WorkerId, head_room: int,
                rooms: Mapping[WorkerId, int], links: Mapping[WorkerId, float],
                need_stage: bool) -> _Choice | None:
    """The fewest stages that complete the model with `head`, lowest total latency first."""
    others = sorted((w for w in links if rooms[w] > 0), key=lambda w: (-rooms[w], w))
    for count in range(0 if not need_stage else 1, len(others) + 1):
        if head_room + sum(rooms[w] for w in others[:count]) < model.n_layers:
            continue  # even the largest `count` workers are too small
        candidates = itertools.islice(itertools.combinations(others, count), MAX_COMBINATIONS)
        fitting = [c for c in candidates
                   if head_room + sum(rooms[w] for w in c) >= model.n_layers]
        best = min(fitting, key=lambda c: (sum(links[w] for w in c), -sum(rooms[w] for w in c),
                                           sorted(c)))
        ordered = tuple(sorted(best, key=lambda w: (links[w], w)))
        return _Choice(head, ordered, (head_room, *(rooms[w] for w in ordered)),
                       sum(links[w] for w in ordered))
    return None


def plan_split(model: ModelSpec, free: Mapping[WorkerId, int],
               workers: Mapping[WorkerId, WorkerInfo], policy: SplitPolicy) -> Replica | None:
    """The split replica for `model` over workers with `free` bytes, or None if none fits."""
    fixed_head = model.shared_bytes + policy.engine_overhead_bytes
    rooms = {w: layer_room(f, policy.stage_overhead_bytes, model) for w, f in free.items()}
    best: _Choice | None = None
    for head in sorted(free, key=lambda w: (-free[w], w)):
        head_room = layer_room(free[head], fixed_head, model)
        if head_room < 1:
            continue
        links = {}
        for other in free:
            link = rtt(workers, head, other) if other != head else None
            if other != head and (link is None or link <= policy.max_link_rtt_ms):
                links[other] = link if link is not None else policy.max_link_rtt_ms
        choice = _stage_sets(model, head, min(head_room, model.n_layers - 1), rooms, links,
                             need_stage=True)
        if choice and (best is None or (len(choice.stages), choice.latency_ms)
                       < (len(best.stages), best.latency_ms)):
            best = choice
    if best is None:
        return None
    # Room beyond the whole model says nothing about speed: cap it before sharing layers.
    counts = proportional(model.n_layers, [min(r, model.n_layers) for r in best.rooms])
    stages, start = [], 0
    for worker, n in zip((best.head, *best.stages), counts, strict=True):
        stages.append(Assignment(worker, start, start + n))
        start += n
    return Replica(tuple(stages))


def stage_bytes(model: ModelSpec, stage: Assignment, is_head: bool, policy: SplitPolicy) -> int:
    """Memory a stage takes on its worker."""
    layers = stage.layer_end - stage.layer_start
    fixed = (model.shared_bytes + policy.engine_overhead_bytes if is_head
             else policy.stage_overhead_bytes)
    return fixed + model.layer_weight_bytes(stage.layer_start, stage.layer_end) + \
        model.layer_kv_bytes(layers)
