"""Groups of slots in flight: a split's head may run its slots as G groups, each on its own
llama.cpp context over the one model (its own KV cache and compute buffers, the weights
shared), each stepping from its own thread. While one group's step waits on the stages'
round trips, the others compute (docs/split-latency.md, sections 4 and 6).

What is decided here is pure: how many groups a load gets, and which group a new request
joins. The engine (core.py) holds the groups and their threads.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from meshllm.common.errors import ConfigError
from meshllm.worker.engine.batch.backend import Backend
from meshllm.worker.engine.batch.config import BatchConfig
from meshllm.worker.engine.batch.draft import Drafter
from meshllm.worker.engine.batch.prefix import FreeSlot, place
from meshllm.worker.engine.batch.prefix import reusable as prefix_reusable
from meshllm.worker.engine.batch.request import Active, Submission
from meshllm.worker.engine.batch.step import Counters, StepRunner

# Below this round trip per step (loopback, a LAN) one group: more contexts only resend
# their graphs and split the rows into smaller, dearer steps (0.96x of one group at +0 ms
# on a 3-stage split here), and the round trip has little to hide.
GROUPS_FROM_RTT_S = 0.005


def groups_for_link(n_slots: int, link_rtt_s: float, stages: int) -> int:
    """How many groups a head runs. One on a fast link or a whole model. Else one per
    process of the split (head and stages, each kept busy while the others compute) plus
    one more to cover the round trips, with at least 2 slots a group (a group of one
    sequence steps at a cost per row that no overlap pays back). Measured on a 3-stage
    split at +20 ms per hop: 4 groups keep 0.86 of their 0 ms speed, one 0.72."""
    if stages < 1 or link_rtt_s < GROUPS_FROM_RTT_S:
        return 1
    return max(1, min(stages + 2, n_slots // 2))


def group_sizes(n_slots: int, groups: int) -> tuple[int, ...]:
    """The slots of each group: as even as they go, the larger groups first."""
    base, extra = divmod(n_slots, groups)
    return tuple(base + (1 if g < extra else 0) for g in range(groups))


def reusable(free_cached: Sequence[Sequence[int]], prompt: Sequence[int]) -> int:
    """The prompt tokens a group's free slots could skip (prefix.place's rule: a slot counts
    only when it shares at least MIN_SHARED of the prompt)."""
    return max((prefix_reusable(c, prompt) for c in free_cached), default=0)


def choose_group(room: Sequence[int], loads: Sequence[int], reuse: Sequence[int]
                 ) -> int | None:
    """The group a new request joins, of those with room: the one holding the longest
    reusable prefix of its prompt (a cached conversation is worth more than balance: the
    other groups would recompute it), else the least loaded (their steps stay alike, so no
    group holds the round slower), lowest index first. None when every group is full."""
    open_groups = [g for g in range(len(room)) if room[g] > 0]
    if not open_groups:
        return None
    return min(open_groups, key=lambda g: (-reuse[g], loads[g], g))


def assign(room: Sequence[int], loads: Sequence[int], reuse: Sequence[Sequence[int]]
           ) -> list[int | None]:
    """The groups of queued requests, in queue order (`reuse[k]`: what each group could
    reuse of request k's prompt), each choose_group's pick with the earlier ones counted
    in: a burst of requests spreads over the groups at once."""
    room, loads = list(room), list(loads)
    picks: list[int | None] = []
    for request_reuse in reuse:
        g = choose_group(room, loads, request_reuse)
        picks.append(g)
        if g is not None:
            room[g] -= 1
            loads[g] += 1
    return picks


@dataclass
class Group:
    """One group's context and runner, and what the engine's lock guards of it."""

    backend: Backend
    runner: StepRunner
    counters: Counters
    size: int                   # its slots
    load: int = 0               # requests admitted and not yet finished
    cancelled: set[str] = field(default_factory=set)
    pending_rtt_s: float | None = None  # a new link round trip, for its next step
    # Its free slots' cached tokens as of its last step (read by other threads' choices).
    free_cached: tuple[tuple[int, ...], ...] = ()

    @property
    def room(self) -> int:
        return self.size - self.load

    def seat(self, sub: Submission, prefix_reuse: bool) -> int:
        """Puts an admitted request in the free slot prefix.place picks (group's thread);
        returns the prompt tokens it reuses there."""
        r = self.runner
        free = [FreeSlot(i, r.cached[i], r.freed_at[i]) for i, a in enumerate(r.slots)
                if a is None]
        spot = place(free, sub.prompt, prefix_reuse)
        reuse = r.trim(spot.index, spot.reuse)
        r.seat(spot.index, Active(sub, reuse, r.next_admission(), self.backend.piece,
                                  self.backend.is_eog))
        return reuse

    def publish_free(self) -> None:
        """Copies what its free slots hold, for choose_group (group's own thread)."""
        r = self.runner
        self.free_cached = tuple(tuple(r.cached[i]) for i, a in enumerate(r.slots)
                                 if a is None and r.cached[i])


def total(counters: Sequence[Counters]) -> Counters:
    """The groups' counters summed (each group's are written by its own thread only)."""
    out = Counters()
    for c in counters:
        for name in vars(out):
            setattr(out, name, getattr(out, name) + getattr(c, name))
    return out


def make_groups(config: BatchConfig, backend: Backend, drafter: Drafter | None,
                clock: Callable[[], float]) -> list[Group]:
    """The first group runs on `backend`, the others on contexts of their own over its
    model. They share the drafter, which must then be free: the n-gram drafter keeps no
    state, so threads may share it (BatchConfig refuses a draft model with groups)."""
    if config.groups > 1 and drafter is not None and not drafter.free:
        raise ConfigError("groups", "a drafter with state serves one group")
    groups: list[Group] = []
    for g, size in enumerate(group_sizes(config.n_slots, config.groups)):
        gc = config if config.groups == 1 else config.group_config(size)
        own = backend if g == 0 else _sibling(backend, gc)
        counters = Counters()
        runner = StepRunner(gc, own, drafter, counters, clock,
                            busy_elsewhere=functools.partial(_busy_besides, groups, g))
        groups.append(Group(own, runner, counters, size))
    return groups


def _busy_besides(groups: Sequence[Group], g: int) -> bool:
    """Whether another group holds requests (read without the lock: a hint for tuning)."""
    return any(other.load for i, other in enumerate(groups) if i != g)


def _sibling(backend: Backend, config: BatchConfig) -> Backend:
    sibling = getattr(backend, "sibling", None)
    if sibling is None:
        raise ConfigError("groups", "this backend makes no second context: groups 1")
    made: Backend = sibling(config.context(config.n_batch))
    return made


def assignment(groups: Sequence[Group], queue: Collection[Submission], prefix_reuse: bool
               ) -> list[tuple[Submission, int | None]]:
    """The queue's first requests, as many as there is room, with their groups (assign)."""
    room = [g.room for g in groups]
    head = list(itertools.islice(queue, sum(room)))
    if len(groups) == 1:
        return [(sub, 0) for sub in head]
    reuse = [[reusable(g.free_cached, sub.prompt) if prefix_reuse and g.room else 0
              for g in groups] for sub in head]
    return list(zip(head, assign(room, [g.load for g in groups], reuse), strict=True))


def claimable(groups: Sequence[Group], queue: Collection[Submission], g: int,
              prefix_reuse: bool) -> bool:
    """Whether a queued request would join group g now."""
    return groups[g].room > 0 and any(p == g for _, p in assignment(groups, queue,
                                                                      prefix_reuse))
