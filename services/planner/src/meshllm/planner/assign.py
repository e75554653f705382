"""One planning round as a pure function: the placements that follow from the declared
models, the workers, what is placed now and the demand the gateways measured.

A round, in order:
1. What is placed now, less what is gone: replicas with a stage on a worker that left,
   and retiring replicas that every one of their workers has unloaded (drained).
2. A first replica for every declared model without one that is wanted: by demand, by
   `min_replicas`, or (with `fill_free_memory`) because memory is free. `place` makes it,
   whole on one worker, as expert shards (a mixture of experts) or split over the fewest,
   so a model too big for any worker is still served. A model served by shards gets one
   more on each worker that joined with room; one dealt evenly is dealt again once its
   calibration arrives, and one dealt by a ranking once that ranking changes. One whose
   live shards lack some expert (a worker holding its only copy left) after that is dealt
   again over the workers left, or kept as it is where they cannot hold every expert.
   Nothing new is dealt where no worker can read the model file (none could build it).
3. `rebalance` over the models served whole: adds where demand per replica is high,
   retires (marks `Replica.retiring`) where a model is over `max_replicas`, and evicts
   replicas of colder or lower-priority models when a hotter one needs their memory. A
   retiring replica takes no new requests; its worker drains it, then unloads it, and the
   next round after that drops it (step 1). An add lands on the worker at once; the worker
   loads it when its memory is free (after any replica it drains there).
4. With `fill_free_memory`, memory still free gets more replicas of the models served
   whole, highest priority and busiest first, round-robin, up to each `max_replicas`: an
   idle replica costs nothing and makes the next burst free. A cold model's replica is
   taken back only when another model needs the memory (step 3).

Before step 1 each model gets its slots (`place.size_slots`): those it asked for, or fewer
when its KV cache at that many fits no worker whole and fewer would. The round plans with
those specs and returns them: the planner publishes them, so workers run that many.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshllm.common.demand import ModelDemand
from meshllm.common.moe import ExpertRanking
from meshllm.common.types import (
    ExpertDeal,
    LoadState,
    ModelDeclaration,
    ModelId,
    ModelSpec,
    Placement,
    Replica,
    WorkerId,
    WorkerInfo,
    whole,
)
from meshllm.planner.demand import (
    CurrentAssignment,
    HeldReplica,
    Moves,
    RebalancePolicy,
    ReplicaPhase,
    SizedModel,
    WorkerCapacity,
)
from meshllm.planner.experts import grow_shards, ranking_moved, replica_need
from meshllm.planner.experts_redeal import (
    keep_held,
    mended,
    missing_experts,
    redealt,
    unreadable,
    with_holes,
)
from meshllm.planner.place import PlacementPolicy, place, required_bytes, size_slots
from meshllm.planner.rebalance import rebalance
from meshllm.planner.split import stage_bytes

PhaseKey = tuple[ModelId, WorkerId]


@dataclass(frozen=True)
class RoundPolicy:
    placement: PlacementPolicy = dataclasses.field(default_factory=PlacementPolicy)
    rebalance: RebalancePolicy = dataclasses.field(default_factory=RebalancePolicy)
    fill_free_memory: bool = True  # free memory holds replicas until a model needs it

    @property
    def fills(self) -> bool:
        # Retiring cold surplus early and filling free memory again would undo each other.
        return self.fill_free_memory and not self.rebalance.retire_cold_early


@dataclass(frozen=True)
class RoundInputs:
    specs: Mapping[ModelId, ModelSpec]                 # the declared models that were read
    declarations: Mapping[ModelId, ModelDeclaration]
    workers: Mapping[WorkerId, WorkerInfo]
    published: Mapping[ModelId, Placement]             # what the last round wrote
    demand: Mapping[ModelId, ModelDemand]              # merged over the gateways
    now_s: float                                       # the planner's clock (seconds)
    since_s: Mapping[tuple[ModelId, WorkerId], tuple[ReplicaPhase, float]] = \
        dataclasses.field(default_factory=dict)        # each replica's phase, entered when
    last_grew_s: Mapping[ModelId, float] = dataclasses.field(default_factory=dict)
    last_shrank_s: Mapping[ModelId, float] = dataclasses.field(default_factory=dict)
    rankings: Mapping[str, ExpertRanking] = dataclasses.field(default_factory=dict)  # by
                                                       # model digest (calibrations)


@dataclass(frozen=True)
class RoundResult:
    placements: dict[ModelId, Placement]
    moves: Moves
    current: CurrentAssignment  # what rebalancing saw (phases and their start times)
    specs: dict[ModelId, ModelSpec] = dataclasses.field(default_factory=dict)  # as planned
    slot_notes: dict[ModelId, str] = dataclasses.field(default_factory=dict)  # fewer slots: why


def holds(worker: WorkerInfo | None, model_id: ModelId) -> bool:
    return worker is not None and worker.model_state(model_id) is not None


def live_replicas(placement: Placement, workers: Mapping[WorkerId, WorkerInfo]
                  ) -> tuple[Replica, ...]:
    """The replicas still worth keeping: every stage's worker is here, and a retiring one
    is still held by at least one of them (it has not finished draining)."""
    kept = []
    for replica in placement.replicas:
        if any(w not in workers for w in replica.worker_ids):
            continue
        if replica.retiring and not any(holds(workers.get(w), placement.model_id)
                                        for w in replica.worker_ids):
            continue
        kept.append(replica)
    return tuple(kept)


def phase_of(replica: Replica, model_id: ModelId, workers: Mapping[WorkerId, WorkerInfo]
             ) -> ReplicaPhase:
    if replica.retiring:
        return ReplicaPhase.RETIRING
    head = workers.get(replica.head.worker_id)
    state = head.model_state(model_id) if head else None
    if state is not None and state.state is LoadState.READY and not state.draining:
        return ReplicaPhase.READY
    return ReplicaPhase.LOADING


def held_bytes(placements: Mapping[ModelId, Sequence[Replica]],
               specs: Mapping[ModelId, ModelSpec], policy: PlacementPolicy
               ) -> dict[WorkerId, int]:
    """Memory each worker's placed replicas take, retiring ones included (until drained)."""
    held: dict[WorkerId, int] = {}
    for model_id, replicas in placements.items():
        spec = specs.get(model_id)
        if spec is None:
            continue
        for replica in replicas:
            shard = replica_need(spec, replica, policy.engine_overhead_bytes)
            for i, stage in enumerate(replica.stages):
                need = (shard if shard is not None
                        else required_bytes(spec, policy) if not replica.is_split
                        else stage_bytes(spec, stage, i == 0, policy.split))
                held[stage.worker_id] = held.get(stage.worker_id, 0) + need
    return held


def free_workers(inputs: RoundInputs, placements: Mapping[ModelId, Sequence[Replica]],
                 policy: PlacementPolicy) -> list[WorkerInfo]:
    """The workers with their budgets less what is placed on them."""
    held = held_bytes(placements, inputs.specs, policy)
    return [dataclasses.replace(w, memory_budget_bytes=max(
                1, w.memory_budget_bytes - held.get(w.worker_id, 0)))
            for w in inputs.workers.values()]


def _wanted_first(inputs: RoundInputs, model_id: ModelId, policy: RoundPolicy) -> bool:
    declaration = inputs.declarations.get(model_id)
    demand = inputs.demand.get(model_id)
    asked = demand is not None and (demand.requests > 0 or demand.waiting_requests > 0)
    return policy.fills or asked or (declaration is not None and declaration.min_replicas > 0)


def first_replicas(inputs: RoundInputs, placements: dict[ModelId, list[Replica]],
                   policy: RoundPolicy, deals: dict[ModelId, ExpertDeal] | None = None
                   ) -> dict[ModelId, str]:
    """Place one replica of each wanted model that has none, or its expert shards (edits
    `placements`, and `deals` for shards); the reasons of those that fit nowhere at all,
    whatever else the mesh held."""
    bare = [spec for model_id, spec in inputs.specs.items()
            if not placements.get(model_id) and _wanted_first(inputs, model_id, policy)]
    if not bare:
        return {}
    room = free_workers(inputs, placements, policy.placement)
    caps = {spec.model_id: 1 for spec in bare}
    shard_caps = {m: d.max_replicas for m, d in inputs.declarations.items()}
    placed = place(bare, room, inputs.published, policy.placement, caps, inputs.rankings,
                   shard_caps)
    reasons = {}
    for spec in bare:
        replicas, deal = placed[spec.model_id].replicas, placed[spec.model_id].expert_deal
        if replicas:
            placements[spec.model_id] = list(replicas)
            if deals is not None and deal is not None:
                deals[spec.model_id] = deal
            continue
        alone = place([spec], list(inputs.workers.values()), None, policy.placement)
        reasons[spec.model_id] = alone[spec.model_id].unplaced_reason
    return reasons


def redeal_calibrated(inputs: RoundInputs, placements: dict[ModelId, list[Replica]],
                      deals: dict[ModelId, ExpertDeal]) -> list[ModelId]:
    """Models dealt evenly whose calibration has arrived, or dealt by a ranking that has
    changed since (experts.ranking_moved): their shards are dropped (edits `placements` and
    `deals`) so that this round deals them again by the ranking, on the same workers first.
    Their shards reload once per ranking."""
    again = []
    for model_id, deal in list(deals.items()):
        spec = inputs.specs.get(model_id)
        if spec is None or spec.moe is None:
            continue
        shards = [r.experts for r in placements.get(model_id, []) if r.is_shard]
        if unreadable(spec, inputs.workers.values()):
            continue  # the shards serving stay: a new deal is one no worker could build
        if ranking_moved(spec.moe, shards, deal, inputs.rankings.get(spec.model_digest)):
            placements[model_id] = []
            del deals[model_id]
            again.append(model_id)
    return again


def more_shards(inputs: RoundInputs, placements: dict[ModelId, list[Replica]],
                policy: PlacementPolicy) -> None:
    """Models served by expert shards get a shard on each worker that joined with room
    (edits `placements`), up to their max_replicas."""
    for model_id, replicas in placements.items():
        spec = inputs.specs.get(model_id)
        if spec is None or spec.moe is None or not replicas or not all(
                r.is_shard for r in replicas) or unreadable(spec, inputs.workers.values()):
            continue  # (nobody could build a newcomer's shard)
        free = {w.worker_id: w.memory_budget_bytes
                for w in free_workers(inputs, placements, policy)}
        declaration = inputs.declarations.get(model_id)
        cap = (declaration.max_replicas if declaration else 0) or policy.max_replicas
        replicas.extend(grow_shards(spec, replicas, free, policy.engine_overhead_bytes,
                                    inputs.rankings.get(spec.model_digest),
                                    policy.expert_hot_share, cap))


def mend_uncovered(inputs: RoundInputs, placements: dict[ModelId, list[Replica]],
                   deals: dict[ModelId, ExpertDeal], policy: PlacementPolicy) -> None:
    """Models served by expert shards whose live shards no longer hold every expert (a
    worker holding the only copy of some left, and no worker that joined took them): dealt
    again over the workers left when they can hold a deal of every expert, else kept as
    they are, since they still serve; the deal's why says which (edits `placements` and
    `deals`). Shards that hold every expert stay as they are: a re-deal reloads them all."""
    for model_id, deal in list(deals.items()):
        spec = inputs.specs.get(model_id)
        shards = placements.get(model_id, [])
        if spec is None or spec.moe is None or not shards or not all(
                r.is_shard for r in shards):
            continue  # (served whole or split since: nothing to cover)
        missing = missing_experts(spec.moe, [r.experts for r in shards])
        if not any(missing):
            deals[model_id] = mended(deal)
            continue
        room = free_workers(inputs, {**placements, model_id: []}, policy)
        declaration = inputs.declarations.get(model_id)
        cap = {model_id: declaration.max_replicas if declaration else 0}
        placed = place([spec], room, inputs.published, policy, {model_id: 1},
                       inputs.rankings, cap)[model_id]
        if not placed.replicas:
            deals[model_id] = with_holes(deal, spec, missing, len(shards),
                                         placed.unplaced_reason, policy.engine_overhead_bytes)
            continue
        del deals[model_id]
        replicas = list(placed.replicas)  # whole, or a layer split, where that is what fits
        if placed.expert_deal is not None:
            replicas = keep_held(replicas, {r.head.worker_id: r.experts for r in shards})
            deals[model_id] = redealt(placed.expert_deal, missing, len(replicas))
        placements[model_id] = replicas


def served_whole(spec: ModelSpec, replicas: Sequence[Replica],
                 workers: Mapping[WorkerId, WorkerInfo], policy: PlacementPolicy) -> bool:
    """Whether rebalancing sizes the model: it is held whole, or would be if placed."""
    if spec.force_split or any(r.is_split or r.is_shard for r in replicas):
        return False
    need = required_bytes(spec, policy)
    return any(w.memory_budget_bytes >= need for w in workers.values())


def sized(inputs: RoundInputs, spec: ModelSpec, policy: PlacementPolicy) -> SizedModel:
    declaration = inputs.declarations.get(spec.model_id)
    cap = (declaration.max_replicas if declaration else 0) or policy.max_replicas
    return SizedModel(
        spec.model_id, required_bytes(spec, policy),
        min_replicas=declaration.min_replicas if declaration else 0,
        max_replicas=cap or None, priority=declaration.priority if declaration else 0,
        slots=spec.slots)


def current_assignment(inputs: RoundInputs, placements: Mapping[ModelId, list[Replica]],
                       models: Mapping[ModelId, SizedModel]) -> CurrentAssignment:
    held = []
    for model_id, replicas in placements.items():
        if model_id not in models:
            continue
        for replica in replicas:
            phase = phase_of(replica, model_id, inputs.workers)
            key = (model_id, replica.head.worker_id)
            seen = inputs.since_s.get(key)
            since = seen[1] if seen is not None and seen[0] is phase else inputs.now_s
            held.append(HeldReplica(model_id, replica.head.worker_id, phase, since))
    return CurrentAssignment(inputs.now_s, tuple(held), dict(inputs.last_grew_s),
                             dict(inputs.last_shrank_s))


def capacities(inputs: RoundInputs, placements: Mapping[ModelId, list[Replica]],
               policy: PlacementPolicy) -> list[WorkerCapacity]:
    return [WorkerCapacity(w.worker_id, w.memory_budget_bytes)
            for w in free_workers(inputs, placements, policy)]


def apply_moves(moves: Moves, placements: dict[ModelId, list[Replica]],
                specs: Mapping[ModelId, ModelSpec]) -> None:
    """Adds land as whole replicas; retires mark the replica retiring (its worker drains)."""
    retiring = {(r.model_id, r.worker_id) for r in moves.retires}
    for model_id in {r.model_id for r in moves.retires}:
        placements[model_id] = [
            dataclasses.replace(r, retiring=True)
            if (model_id, r.head.worker_id) in retiring and not r.is_split else r
            for r in placements.get(model_id, [])]
    for add in moves.adds:
        spec = specs[add.model_id]
        placements.setdefault(add.model_id, []).append(whole(add.worker_id, spec.n_layers))


def fill(inputs: RoundInputs, placements: dict[ModelId, list[Replica]],
         models: Mapping[ModelId, SizedModel], policy: PlacementPolicy) -> None:
    """More replicas of the models served whole into memory still free, round-robin,
    highest priority and busiest first, up to each model's max_replicas."""
    free = {w.worker_id: w.memory_budget_bytes
            for w in free_workers(inputs, placements, policy)}

    def busy(model: SizedModel) -> float:
        demand = inputs.demand.get(model.model_id)
        return demand.offered_load(model.slots) if demand else 0.0

    order = sorted(models.values(), key=lambda m: (-m.priority, -busy(m), m.model_id))
    most = max(free.values(), default=0)
    growing = True
    while growing:
        growing = False
        for model in order:
            replicas = placements.setdefault(model.model_id, [])
            if (not replicas or model.replica_bytes > most  # a full mesh: nothing to scan
                    or (model.max_replicas and len(replicas) >= model.max_replicas)):
                continue  # a model without any replica was left so on purpose (step 2)
            hosts = {w for r in replicas for w in r.worker_ids}
            fits = [w for w, f in free.items() if f >= model.replica_bytes and w not in hosts]
            if fits:
                chosen = min(fits, key=lambda w: (-free[w], w))
                free[chosen] -= model.replica_bytes
                most = max(free.values())
                replicas.append(whole(chosen, inputs.specs[model.model_id].n_layers))
                growing = True


def sized_specs(inputs: RoundInputs, policy: PlacementPolicy
                ) -> tuple[dict[ModelId, ModelSpec], dict[ModelId, str]]:
    """Each model with the slots it gets on these workers, and why where it got fewer."""
    budgets = [w.memory_budget_bytes for w in inputs.workers.values()]
    sizings = {m: size_slots(spec, budgets, policy) for m, spec in inputs.specs.items()}
    return ({m: s.spec for m, s in sizings.items()},
            {m: s.note for m, s in sizings.items() if s.note})


def next_placements(inputs: RoundInputs, policy: RoundPolicy) -> RoundResult:
    """The placements after this round's moves; see the module docstring."""
    specs, notes = sized_specs(inputs, policy.placement)
    inputs = dataclasses.replace(inputs, specs=specs)
    placements = {m: list(live_replicas(p, inputs.workers))
                  for m, p in inputs.published.items() if m in inputs.specs}
    deals = {m: p.expert_deal for m, p in inputs.published.items()
             if p.expert_deal is not None and any(r.is_shard for r in placements.get(m, []))}
    redeal_calibrated(inputs, placements, deals)
    reasons = first_replicas(inputs, placements, policy, deals)
    more_shards(inputs, placements, policy.placement)
    mend_uncovered(inputs, placements, deals, policy.placement)
    models = {m: sized(inputs, spec, policy.placement) for m, spec in inputs.specs.items()
              if served_whole(spec, placements.get(m, []), inputs.workers, policy.placement)
              and m not in reasons}
    current = current_assignment(inputs, placements, models)
    moves = rebalance(list(models.values()), capacities(inputs, placements, policy.placement),
                      inputs.demand, current, policy.rebalance)
    apply_moves(moves, placements, inputs.specs)
    if policy.fills:
        fill(inputs, placements, models, policy.placement)
    result = {
        m: Placement(m, tuple(sorted(placements.get(m, []), key=lambda r: r.head.worker_id)),
                     required_bytes(spec, policy.placement), reasons.get(m, ""), deals.get(m))
        for m, spec in inputs.specs.items()}
    return RoundResult(result, moves, current, specs, notes)
