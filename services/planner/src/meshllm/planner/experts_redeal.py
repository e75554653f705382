"""Expert shards that no longer hold every expert between them, and expert shards that no
worker could build, as pure functions over a snapshot (the planning round in assign.py
and place() act on them).

The deal puts every expert of every layer on at least one shard (two from three shards
on, so that losing one shard loses none). A worker that dies takes its shard with it, and
where that shard held the only copy of some experts, the shards left have holes: the
tokens the router sends to those experts go to lesser ones on every shard, so the mesh
serves a smaller model than it was asked to. The round deals such a model again over the
workers left when they can hold every expert, and otherwise keeps the shards it has (they
still serve) and says what is missing and what memory would hold it.

A shard is cut by a worker from the model file it can read, or received from a peer that
can read the file (worker/shard_source.py). Workers list the sha256 of the MoE files they
can read in their records (WorkerInfo.model_files); when none lists the model's, no worker
can build a new shard of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from meshllm.common.config import format_size
from meshllm.common.moe import ExpertSelection, MoeLayout, expert_list, layer_runs
from meshllm.common.types import ExpertDeal, ModelSpec, Replica, WorkerId, WorkerInfo
from meshllm.planner.experts import shard_need, shards_why

HOLES = "expert shards with holes: "  # opens the why of a deal whose shards lack experts
MAX_RUNS = 4     # runs of layers named in a why; the rest are counted


def missing_experts(layout: MoeLayout, selections: Sequence[ExpertSelection]
                    ) -> ExpertSelection:
    """Per MoE layer, the experts on none of `selections` (every layer empty: covered).
    Runs every round for every model served by shards, hence one set per layer (128
    experts x 48 layers x 20 shards of 64: about 1 ms)."""
    missing = []
    for layer in range(layout.moe_layers):
        held = set().union(*(s[layer] for s in selections))
        missing.append(tuple(e for e in range(layout.expert_count) if e not in held))
    return tuple(missing)


def _experts(experts: Sequence[int]) -> str:
    if len(experts) == 1:
        return f"expert {experts[0]}"
    listed = expert_list(experts)
    return listed if listed.endswith("...)") else f"experts {listed}"  # cut: counted


def describe_missing(missing: ExpertSelection) -> str:
    """`experts 3,5 of layers 0-3; expert 2 of layer 5`: each run of layers that lack the
    same experts (layers lacking none left out), the first MAX_RUNS of them."""
    parts = [f"{_experts(experts)} of {layers}" for layers, experts in layer_runs(missing)
             if experts]
    more = len(parts) - MAX_RUNS
    return "; ".join(parts[:MAX_RUNS]) + (f"; and {more} more runs of layers" if more > 0
                                          else "")


def unreadable(spec: ModelSpec, workers: Iterable[WorkerInfo]) -> str:
    """Why no worker could build an expert shard of `spec` ("": one can): none lists the
    file's sha256 among the files it reads, so none can cut a shard or send one. Shards in
    workers' caches do not count: a new deal's selections are not among them. A spec
    without a digest has nothing to match (no worker lists it), so it counts as readable,
    as before workers listed their files."""
    if not spec.model_digest or any(spec.model_digest in w.model_files for w in workers):
        return ""
    return (f"no worker lists the file of {spec.model_id} (sha256 {spec.model_digest[:12]}) "
            "among the files it can read, so none can cut an expert shard of it or send "
            f"one to another: put {spec.source} on at least one worker (a worker still "
            "hashing the file lists it when done)")


def keep_held(shards: Sequence[Replica], held: Mapping[WorkerId, ExpertSelection]
              ) -> list[Replica]:
    """`shards` (a new deal) with their selections moved between shards of the same size
    so that a worker whose shard `held` is among them keeps it: a shard whose selection
    changes reloads, one that keeps it does not. The deal's selections, and each worker's
    size, stay the same: the coverage, the hot set and the memory too."""
    pool = [r.experts for r in shards]
    chosen: dict[WorkerId, ExpertSelection] = {}
    for replica in shards:
        mine = held.get(replica.head.worker_id)
        if mine is not None and mine in pool and len(mine[0]) == len(replica.experts[0]):
            pool.remove(mine)
            chosen[replica.head.worker_id] = mine
    for replica in shards:  # the rest: any selection left of the size the worker holds
        if replica.head.worker_id not in chosen:
            size = len(replica.experts[0])
            pick = next(s for s in pool if len(s[0]) == size)
            pool.remove(pick)
            chosen[replica.head.worker_id] = pick
    return [dataclasses.replace(r, experts=chosen[r.head.worker_id]) for r in shards]


def redealt(deal: ExpertDeal, missing: ExpertSelection, shards: int) -> ExpertDeal:
    """The deal of shards dealt again because the live ones lacked `missing`."""
    return dataclasses.replace(deal, why=(
        f"dealt again over {shards} workers: {describe_missing(missing)} were on no live "
        f"shard (the shard holding their only copy is gone); {deal.why}"))


def with_holes(deal: ExpertDeal, spec: ModelSpec, missing: ExpertSelection, live: int,
               refusal: str, overhead_bytes: int) -> ExpertDeal:
    """The deal of `live` shards kept although they lack `missing`, since dealing again
    failed (`refusal`): the why names the experts and the memory that would hold them (a
    worker that joins with that much free gets a shard of the experts held fewest times:
    these first)."""
    layout = spec.moe
    if layout is None:
        raise ValueError(f"model {spec.model_id} has no experts")
    most = max(len(m) for m in missing)
    weights = most * (layout.bytes_per_expert + layout.router_bytes_per_expert)
    kept = ("the shard left serves as it is" if live == 1
            else f"the {live} shards left serve as they are")
    return dataclasses.replace(deal, why=(
        f"{HOLES}{describe_missing(missing)} on no live shard (the shard holding their only "
        f"copy is gone); {kept}, since dealing again over the workers left fails: "
        f"{refusal}. Holding them takes {format_size(weights)} more "
        f"({most} experts per layer): a worker that joins with "
        f"{format_size(shard_need(spec, most, overhead_bytes))} free gets a shard of them"))


def mended(deal: ExpertDeal) -> ExpertDeal:
    """The deal of shards holding every expert again (a worker with room, one that joined
    or one another model left, took the ones missing): its why no longer speaks of holes."""
    if not deal.why.startswith(HOLES):
        return deal
    return dataclasses.replace(deal, why=(
        "a worker with room took the experts no live shard held; "
        f"{shards_why(deal.calibration_tokens)}"))
