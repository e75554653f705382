"""Rebalancing: which replicas to add and retire so capacity follows demand, as a pure
function over snapshots (the declared models, their demand, the workers, what they hold).

How it decides:
- Load is a model's arrivals times the time a request holds a slot, per slot (Erlangs,
  `ModelDemand.offered_load`); utilization is that load over the replicas it has on
  workers that stay, loading ones included. Over `add_above` (or a queue wait over
  `max_queue_wait_s` while over `target`), with `min_requests` in the window, the model
  is sized in one step to `target`. A model with requests and no replica gets one at
  once (a cold start). Between the thresholds nothing moves; `min_replicas` and
  `max_replicas` bound it all.
- Adds go, highest priority first and the most starved model first within a priority,
  to a worker with room: fewest replicas, then the tightest fit (big holes stay for big
  models). Only when none has room does it evict one replica of a model of lower
  priority, or of equal priority that stays under `target` without it, coldest first (an
  idle model first of all, down to zero). The add then waits for that replica to drain
  (`AddReplica.after`).
- A cold model's surplus stays loaded until another model needs the memory: an idle
  replica holds memory nobody wants, and keeping it makes the next burst free. With
  `retire_cold_early` it goes as soon as the model is under `retire_below`, and an idle
  model goes to zero after `idle_to_zero_s`. Over `max_replicas` or no longer declared,
  replicas always retire.
- Safety and hysteresis: a retire never takes a model's ready replicas below what it
  keeps while replacements load (make-before-break; a donor with demand keeps its last
  ready replica); a replica retires only after `min_age_s`; a model that grew does not
  shrink for `cooldown_s`, nor the reverse (cold starts exempt); every move sizes a model
  to `target`, inside the dead band, so a move never lands on a trigger; demand measured
  over less than `min_window_s`, or not at all, never retires anything. A leaving worker
  counts as gone: its replicas serve until it drains and are replaced elsewhere.
- Replicas are whole, one worker each; a model too big for one worker is left to `place`
  and its split planning (declare it with its first replica placed, max_replicas 1).

Against mesh-llm (a standby node promotes when a model's requests per server are >= 3x
the coldest model's and >= 10 a minute, or when it has no server) and Petals (a server
moves its span of blocks when the swarm's balance quality, bottleneck throughput now over
what it would be after the move, is under 0.75):
- Both move one node at a time, each from its own view of the gossip (Petals adds random
  delays so nodes don't all jump together). Here one planner sizes every model in one
  step: a burst needing twenty replicas gets twenty adds in one round, not one a period.
- mesh-llm counts requests, so a model with few long generations looks cold and one that
  refuses requests looks no hotter; Petals balances capacity per block, not demand. Load
  here is slot time, refused requests included.
- Both triggers are relative (3x the coldest, 0.75 of the best balance): with every
  model busy nothing fires, and noise between two quiet models can. Here thresholds are
  absolute utilizations around a dead band, and a short-window rise counts only beyond
  Poisson noise.
- Both move a serving node (break, then make): the model it leaves loses a replica for a
  whole load even when a free node could have taken the work. Here free memory goes
  first, a new replica loads before anything it replaces goes, and memory held by cold
  models is taken only when wanted, so nothing reloads for nothing.
- Neither has min/max replicas or priorities.
bench/rebalance_sim.py measures it (50 workers, 10 models, a shifting trace, seed 7):
against the mesh-llm rule at its 60 s period, 0.19x the requests that waited over 1 s,
none refused (811 there), 0.86x the loads.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from meshllm.common.config import format_size
from meshllm.common.types import ModelId
from meshllm.planner.demand import (
    CurrentAssignment,
    HeldReplica,
    ModelDemand,
    Moves,
    RebalancePolicy,
    ReplicaPhase,
    SizedModel,
    WorkerCapacity,
)
from meshllm.planner.rebalance_state import Plan, PlannedModel, PlannedWorker


@dataclass(frozen=True)
class Wanted:
    count: int   # replicas, ready or loading, within min_replicas and max_replicas
    reason: str  # why, in plain words
    asked: int   # what demand alone asked for


def wanted_replicas(model: SizedModel, demand: ModelDemand, have: int,
                    policy: RebalancePolicy) -> Wanted:
    """How many replicas the model wants, and why.

    `have`: its ready and loading replicas on workers that stay. Offered load does not
    depend on the replicas that served it, so utilization is taken over these: replicas
    loading count as the capacity they are about to be, and replicas on leaving workers
    as gone (replaced when the rest would run hot)."""
    want, why = _by_demand(demand, demand.offered_load(model.slots), have, policy)
    if want < model.min_replicas:
        return Wanted(model.min_replicas, f"{why}; kept at min_replicas {model.min_replicas}",
                      want)
    if model.max_replicas is not None and want > model.max_replicas:
        return Wanted(model.max_replicas, f"{why}; capped at max_replicas {model.max_replicas}",
                      want)
    return Wanted(want, why, want)


def _by_demand(demand: ModelDemand, load: float, have: int,
               policy: RebalancePolicy) -> tuple[int, str]:
    window = f"{demand.window_s:g} s"
    if demand.requests <= 0 and load <= 0:
        if demand.window_s < policy.min_window_s:
            return have, f"no requests yet, but only {window} measured"
        if demand.idle_s < policy.idle_to_zero_s:
            return min(have, 1), (f"no requests for {demand.idle_s:.0f} s (zero after "
                                  f"{policy.idle_to_zero_s:g} s)")
        return 0, f"no requests for {demand.idle_s:g} s"
    if have == 0:
        return max(1, policy.sized(load)), "requests arrived and it has no replica"
    util = load / have
    busy = f"{util:.0%} of its slots busy"
    if demand.mean_queue_wait_s > 0:
        busy += f", mean queue wait {demand.mean_queue_wait_s:.1f} s"
    hot = util > policy.add_above or (demand.mean_queue_wait_s > policy.max_queue_wait_s
                                      and util > policy.target)
    if hot and demand.requests >= policy.min_requests:
        return (max(policy.sized(load), have + 1),
                f"{busy} over {window} (adds over {policy.add_above:.0%} or "
                f"{policy.max_queue_wait_s:g} s)")
    if util < policy.retire_below and demand.window_s >= policy.min_window_s:
        return max(1, policy.sized(load)), (
            f"{busy} over {window} (retires under {policy.retire_below:.0%})")
    return have, f"{busy}, inside the dead band"


def rebalance(models: Sequence[SizedModel], workers: Sequence[WorkerCapacity],
              demand: Mapping[ModelId, ModelDemand], current: CurrentAssignment,
              policy: RebalancePolicy | None = None) -> Moves:
    """The moves that make capacity follow demand; see the module docstring."""
    policy = policy or RebalancePolicy()
    plan = Plan.start(models, workers, current, policy)
    for model in plan.models.values():
        # No figures at all (a gateway restarting) is no measurement, not "no requests".
        unknown = ModelDemand(model.model_id, window_s=0.0)
        _size(plan, model, demand.get(model.model_id, unknown))
    _retire_undeclared(plan)
    for model in plan.by_priority():
        _retire_surplus(plan, model)
    _add_wanted(plan)
    return plan.moves()


def _size(plan: Plan, model: PlannedModel, demand: ModelDemand) -> None:
    wanted = wanted_replicas(model.decl, demand, model.have, plan.policy)
    model.want, model.why = wanted.count, wanted.reason
    model.load = demand.offered_load(model.decl.slots)
    model.measured = demand.window_s >= plan.policy.min_window_s
    if wanted.asked > model.have >= wanted.count:
        plan.block(model, f"wants {wanted.asked - model.have} more: {wanted.reason}")


def _retire_undeclared(plan: Plan) -> None:
    for held in plan.current.replicas:
        worker = plan.workers.get(held.worker_id)
        if (held.model_id not in plan.models and worker is not None
                and not worker.info.leaving and held.phase is not ReplicaPhase.RETIRING):
            plan.retire(held, 0, "no longer declared")


def _retire_order(plan: Plan, model: PlannedModel) -> list[HeldReplica]:
    """Loading replicas first (nothing to drain), then those on the most crowded workers."""
    return sorted(model.staying, key=lambda r: (r.phase is ReplicaPhase.READY,
                                                -plan.workers[r.worker_id].count,
                                                r.worker_id))


def _retire_surplus(plan: Plan, model: PlannedModel) -> None:
    surplus = model.have - model.want
    if surplus <= 0:
        return
    forced = model.decl.max_replicas is not None and model.have > model.decl.max_replicas
    if not (forced or plan.policy.retire_cold_early):
        return  # kept loaded: an eviction takes it when another model needs the memory
    if not plan.policy.retire_cold_early and model.decl.max_replicas is not None:
        surplus = model.have - model.decl.max_replicas  # only what is over the cap goes
    keep_ready = min(model.want, model.ready)
    waited = _waited(plan, model, forced)
    for held in _retire_order(plan, model):
        if surplus == 0:
            return
        ready_after = model.ready - (held.phase is ReplicaPhase.READY)
        if ready_after < keep_ready:
            plan.block(model, f"wants {surplus} fewer but keeps its last {keep_ready} ready "
                              "until the replicas loading are ready (make-before-break)")
            return
        young = plan.now_s - held.since_s < plan.policy.min_age_s
        if waited and (forced or not young):
            plan.retire(held, model.decl.replica_bytes, model.why)
            surplus -= 1
    if surplus and waited:
        plan.block(model, f"wants {surplus} fewer ({model.why}) but its replicas are younger "
                          f"than {plan.policy.min_age_s:g} s")


def _waited(plan: Plan, model: PlannedModel, forced: bool) -> bool:
    """Whether the model's cool-down since its last move the other way is over; says why
    not. Growing after growing needs none: loading replicas already count."""
    shrinking = model.want < model.have
    last = (plan.current.last_grew_s if shrinking else plan.current.last_shrank_s)
    since = plan.now_s - last.get(model.model_id, -math.inf)
    if forced or since >= plan.policy.cooldown_s:
        return True
    plan.block(model, f"wants {model.want - model.have:+d} ({model.why}) but "
                      f"{'grew' if shrinking else 'shrank'} {since:.0f} s ago "
                      f"(cool-down {plan.policy.cooldown_s:g} s)")
    return False


def _add_wanted(plan: Plan) -> None:
    """Adds, one at a time to the most starved model of the highest priority."""
    queue = {m.model_id: m for m in plan.models.values()
             if m.want > m.have and (m.have < m.decl.min_replicas or m.have == 0
                                     or _waited(plan, m, False))}
    givers = GiverOrder(plan)
    while queue:
        model = min(queue.values(),
                    key=lambda m: (-m.decl.priority, -m.projected_util, m.model_id))
        if not _add_one(plan, model, givers):
            plan.block(model, f"wants {model.want - model.have} more ({model.why}) but "
                              f"{_no_room(plan, model)}")
            del queue[model.model_id]
        elif model.have >= model.want:
            del queue[model.model_id]


class GiverOrder:
    """The models by (priority, utilization once they give a replica, id): the order
    evictions look for a giver in, kept sorted as models give, not sorted again for each
    eviction (at a thousand workers there are thousands)."""

    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        self._keys = {m.model_id: self._key(m) for m in plan.models.values()}
        self._order = sorted(self._keys.values())

    @staticmethod
    def _key(model: PlannedModel) -> tuple[int, float, ModelId]:
        return model.decl.priority, model.util_after_giving, model.model_id

    def up_to(self, priority: int) -> Iterator[PlannedModel]:
        for key in self._order:
            if key[0] > priority:
                return
            yield self._plan.models[key[2]]

    def changed(self, model: PlannedModel) -> None:
        old = self._keys[model.model_id]
        del self._order[bisect.bisect_left(self._order, old)]
        self._keys[model.model_id] = new = self._key(model)
        bisect.insort(self._order, new)


def _add_one(plan: Plan, model: PlannedModel, givers: GiverOrder) -> bool:
    worker = plan.free_index.best(model.model_id, model.decl.replica_bytes, plan.workers)
    if worker is not None:
        plan.add(model, worker, model.why)
        return True
    eviction = _eviction(plan, model, givers)
    if eviction is None:
        return False
    worker, donor = eviction
    giver = plan.models[donor.model_id]
    plan.retire(donor, giver.decl.replica_bytes,
                f"makes room for {model.model_id} (priority {model.decl.priority} "
                f"against {giver.decl.priority}; {giver.util_after_giving:.0%} busy after)")
    givers.changed(giver)
    plan.add(model, worker, model.why)
    return True


def _eviction(plan: Plan, taker: PlannedModel, givers: GiverOrder
              ) -> tuple[PlannedWorker, HeldReplica] | None:
    """The replica whose memory lets `taker` in: lowest priority, then coldest, then id."""
    now_s, min_age_s = plan.now_s, plan.policy.min_age_s
    for giver in givers.up_to(taker.decl.priority):
        if not _may_give(plan, giver, taker):
            continue
        room = taker.decl.replica_bytes - giver.decl.replica_bytes  # free bytes it needs
        for held in giver.staying:  # in worker order
            worker = plan.workers[held.worker_id]
            if (worker.free >= room and held.phase is ReplicaPhase.READY
                    and now_s - held.since_s >= min_age_s
                    and worker.can_take(taker.model_id, 1)):
                return worker, held
    return None


def _may_give(plan: Plan, giver: PlannedModel, taker: PlannedModel) -> bool:
    """Whether `giver` may lose a replica so that `taker` gets one."""
    policy = plan.policy
    if (giver is taker or not giver.measured or giver.added or giver.want > giver.have
            or giver.have - 1 < giver.decl.min_replicas):
        return False
    if giver.decl.priority > taker.decl.priority or (
            giver.decl.priority == taker.decl.priority
            and giver.util_after_giving > policy.target):
        return False
    if giver.ready - 1 < (1 if giver.load > 0 else 0):
        return False  # its last ready replica stays (make-before-break)
    grew = plan.now_s - plan.current.last_grew_s.get(giver.model_id, -math.inf)
    return grew >= policy.cooldown_s


def _no_room(plan: Plan, model: PlannedModel) -> str:
    open_workers = [w for w in plan.workers.values() if w.can_take(model.model_id, 0)]
    if not open_workers:
        return "every staying worker holds it already or is at its max_models"
    most = max(w.free for w in open_workers)
    return (f"it needs {format_size(model.decl.replica_bytes)} per replica, the most free on "
            f"a worker that could take one is {format_size(max(0, most))}, and no replica of "
            "a colder model of no higher priority can make room")

