"""Placing a mixture-of-experts model by experts, as pure functions.

A MoE model that fits no worker whole can be served by expert shards: each shard is a
standalone model file with the whole trunk and a subset of the routed experts (the worker
cuts it from the full file), served on its own like a replica, so nodes exchange nothing
per token where a layer split passes activations every token.

The deal, per MoE layer: the most chosen experts (the hot share of the smallest shard's
experts, by the calibration ranking, as many as the coverage leaves room for) go on every
shard; the others are dealt out so that each lives on at least one shard, two when there
are three or more, the heaviest of them to the shards holding the least routing so far
(so that no shard lacks the heaviest cold expert of every layer); a shard with room to
spare fills it with the experts held fewest times. Without a ranking nothing is known to be
hot, and every expert is dealt evenly. A shard holds as many experts as its worker's budget
allows beside the trunk, its KV cache and the engine: each expert a shard lacks is one its
tokens cannot reach.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshllm.common.config import format_size
from meshllm.common.moe import ExpertRanking, ExpertSelection, MoeLayout, shard_bytes
from meshllm.common.types import (
    Assignment,
    ExpertDeal,
    ModelSpec,
    Placement,
    Replica,
    WorkerId,
)

# All of the smallest shard's experts, as far as the coverage rule leaves room: a session
# is served by one shard, so a shard's quality is its own experts, and copies of the cold
# ones beyond the rule buy nothing per token (bench/moe_quality.py: never worse than 0.5).
DEFAULT_HOT_SHARE = 1.0


@dataclass(frozen=True)
class ShardPlan:
    shards: tuple[Replica, ...]          # one single-stage replica per worker
    bytes_by_worker: Mapping[WorkerId, int]
    deal: ExpertDeal


def _layout(spec: ModelSpec) -> MoeLayout:
    if spec.moe is None:
        raise ValueError(f"model {spec.model_id} has no experts")
    return spec.moe


def _fixed_bytes(spec: ModelSpec, overhead_bytes: int) -> int:
    """What a shard takes besides its tensors: the file's header (metadata, tokenizer),
    the KV cache of its slots and the engine's buffers."""
    header = max(0, spec.weights_bytes - _layout(spec).total_bytes)
    return header + spec.kv_cache_bytes + overhead_bytes


def shard_need(spec: ModelSpec, n_experts: int, overhead_bytes: int) -> int:
    """Memory a shard with `n_experts` experts per layer takes on its worker."""
    return _fixed_bytes(spec, overhead_bytes) + shard_bytes(_layout(spec), n_experts)


def experts_room(spec: ModelSpec, free_bytes: int, overhead_bytes: int) -> int:
    """The most experts per layer a shard on a worker with `free_bytes` can hold (0: not
    even the trunk with one expert)."""
    layout = _layout(spec)
    room = free_bytes - _fixed_bytes(spec, overhead_bytes)
    per = layout.bytes_per_expert + layout.router_bytes_per_expert
    base = layout.trunk_bytes - layout.expert_count * layout.router_bytes_per_expert
    return max(0, min(layout.expert_count, (room - base) // per)) if per else 0


def replica_need(spec: ModelSpec, replica: Replica, overhead_bytes: int) -> int | None:
    """Memory an expert shard takes (None: the replica is no shard)."""
    if not replica.experts or spec.moe is None:
        return None
    return shard_need(spec, len(replica.experts[0]), overhead_bytes)


def copies_wanted(shards: int) -> int:
    """Copies of each expert: two from three shards on, so that losing one loses none."""
    return 2 if shards >= 3 else 1


def hot_count(sizes: Sequence[int], hot_share: float, ranked: bool, expert_count: int
              ) -> int:
    """Experts every shard holds: the hot share of the smallest shard's, fewer where the
    others would not all fit their copies then (none unranked: nothing is known to be
    hot)."""
    if not ranked or not sizes:
        return 0
    wanted = int(hot_share * min(sizes))
    copies = min(copies_wanted(len(sizes)), len(sizes))
    spare = sum(sizes) - copies * expert_count  # each hot expert saves n - copies slots
    if spare < 0:
        return 0
    return min(wanted, spare // (len(sizes) - copies)) if len(sizes) > copies else wanted


def _spread(order: Sequence[int], held: list[set[int]], room: list[int], copies: int,
            load: list[int], counts: Sequence[int]) -> dict[int, int]:
    """Deals each expert of `order` to `copies` shards, those with the most room first (so
    that every later expert still finds `copies` shards), then those holding the least
    routing so far (`load`, edited), so that no shard lacks the heaviest cold experts of
    every layer; returns how many shards hold each."""
    count = {e: 0 for e in order}
    for expert in order:
        for _ in range(copies):
            open_ = [i for i in range(len(held)) if room[i] > 0 and expert not in held[i]]
            if not open_:
                break
            best = max(open_, key=lambda i: (room[i], -load[i], -i))
            held[best].add(expert)
            room[best] -= 1
            load[best] += counts[expert]
            count[expert] += 1
    return count


def deal_layer(order: Sequence[int], sizes: Sequence[int], hot: int, copies: int,
               counts: Sequence[int] | None = None, load: Sequence[int] | None = None
               ) -> list[tuple[int, ...]]:
    """One MoE layer's experts for each shard (sorted): `order` most chosen first, shard i
    holding sizes[i]; the first `hot` on every shard, each other on `copies` shards (at
    equal room to the shards with the least `load`: the routing `counts` held in earlier
    layers, and in this one as it is dealt), spare room filled with the experts held fewest
    times, best ranked first."""
    rank = {e: i for i, e in enumerate(order)}
    weight = list(counts) if counts is not None else [0] * (max(order, default=-1) + 1)
    cold = list(order[hot:])
    held = [set(order[:hot]) for _ in sizes]
    room = [size - hot for size in sizes]
    carried = list(load) if load is not None else [0] * len(sizes)
    count = _spread(cold, held, room, copies, carried, weight)
    for i in range(len(held)):
        lacking = sorted((e for e in cold if e not in held[i]),
                         key=lambda e: (count[e], rank[e]))
        for expert in lacking[:max(0, room[i])]:  # counts change only for later shards
            held[i].add(expert)
            count[expert] += 1
        room[i] = 0
    return [tuple(sorted(h)) for h in held]


def deal(layout: MoeLayout, sizes: Sequence[int], ranking: ExpertRanking | None,
         hot_share: float) -> list[ExpertSelection]:
    """Each shard's experts per MoE layer (shard i holds sizes[i] per layer). Layer by
    layer, the routing each shard holds is carried on, so that the shard that lacks one
    layer's heaviest cold expert is not the one that lacks the next layer's too. Raises
    ValueError where `sizes` cannot hold the coverage wanted (plan_shards refuses those)."""
    if len(sizes) < 2 or _slots_short(sizes, 0, layout.expert_count):
        raise ValueError(f"shards of {list(sizes)} of {layout.expert_count} experts cannot "
                         f"hold every expert {copies_wanted(len(sizes))} time(s)")
    hot = hot_count(sizes, hot_share, ranking is not None, layout.expert_count)
    copies = min(copies_wanted(len(sizes)), len(sizes))
    even = tuple(range(layout.expert_count))
    load = [0] * len(sizes)
    layers = []
    for layer in range(layout.moe_layers):
        counts = ranking.counts[layer] if ranking else None
        dealt = deal_layer(ranking.layer_order(layer) if ranking else even, sizes, hot,
                           copies, counts, load)
        if counts is not None:
            load = [held + sum(counts[e] for e in d) for held, d in zip(load, dealt,
                                                                           strict=True)]
        layers.append(dealt)
    return [tuple(layer[i] for layer in layers) for i in range(len(sizes))]


def coverage(selections: Sequence[ExpertSelection], expert_count: int) -> int:
    """The fewest shards any expert of any layer lives on (0: some expert on none)."""
    if not selections:
        return 0
    layers = len(selections[0])
    return min(sum(e in s[layer] for s in selections)
               for layer in range(layers) for e in range(expert_count))


def usable_ranking(layout: MoeLayout, ranking: ExpertRanking | None) -> ExpertRanking | None:
    """The ranking when it counts this model's experts and layers (else an even deal)."""
    if ranking is None or ranking.expert_count != layout.expert_count or \
            len(ranking.counts) != layout.moe_layers or ranking.tokens <= 0:
        return None
    return ranking


def ranking_moved(layout: MoeLayout, selections: Sequence[ExpertSelection],
                  dealt: ExpertDeal, ranking: ExpertRanking | None) -> bool:
    """Whether shards holding `selections`, dealt as `dealt`, are to be dealt again by
    `ranking`: an even deal once a usable ranking exists; a calibrated one once the ranking
    counted other tokens (another calibration), or the same tokens but fewer than half the
    shards hold its hot experts in every layer. Stable: the shards a ranking dealt hold its
    hot set, and most added beside them later do too (a newcomer takes the experts short of
    copies first, so not every one), so the same ranking does not deal them again; a
    ranking gone or unusable leaves the shards as they are. The deal records no digest of
    its ranking, only the tokens, hence the hot-set test."""
    ranked = usable_ranking(layout, ranking)
    if ranked is None or not selections:
        return False
    if not dealt.calibration_tokens or dealt.calibration_tokens != ranked.tokens:
        return True
    hot = round(dealt.hot_share * min(len(s[0]) for s in selections))
    tops = [set(ranked.layer_order(layer)[:hot]) for layer in range(layout.moe_layers)]
    holding = sum(all(top <= set(s[layer]) for layer, top in enumerate(tops))
                  for s in selections)
    return 2 * holding < len(selections)


def _slots_short(sizes: Sequence[int], hot: int, expert_count: int) -> int:
    """Expert slots missing for the coverage wanted (0: enough)."""
    need = min(copies_wanted(len(sizes)), len(sizes)) * (expert_count - hot)
    return max(0, need - sum(size - hot for size in sizes))


def _refusal(spec: ModelSpec, sizes: Sequence[int], overhead_bytes: int, short: int) -> str:
    layout = _layout(spec)
    one = format_size(shard_need(spec, 1, overhead_bytes))
    if len(sizes) < 2:
        return (f"expert shards need two workers with room for the trunk and one expert "
                f"each ({one}); {len(sizes)} have it")
    return (f"{len(sizes)} expert shards holding {sorted(sizes, reverse=True)} of "
            f"{layout.expert_count} experts would leave {short} expert copies unplaced: "
            f"every expert must live on {copies_wanted(len(sizes))} shard(s)")


def plan_shards(spec: ModelSpec, free: Mapping[WorkerId, int], overhead_bytes: int,
                ranking: ExpertRanking | None = None, hot_share: float = DEFAULT_HOT_SHARE,
                max_shards: int = 0, previous: Placement | None = None) -> ShardPlan | str:
    """Expert shards for `spec` on the workers with `free` bytes: one on every worker that
    holds the trunk and an expert (previous hosts first, then the most free memory, at
    most `max_shards`; 0: no limit), or why not."""
    layout = _layout(spec)
    held = {r.head.worker_id for r in previous.replicas} if previous else set()
    rooms = {w: experts_room(spec, f, overhead_bytes) for w, f in free.items()}
    hosts = sorted((w for w in rooms if rooms[w] > 0), key=lambda w: (w not in held,
                                                                      -free[w], w))
    hosts = hosts[:max_shards] if max_shards else hosts
    ranked = usable_ranking(layout, ranking)
    sizes = [rooms[w] for w in hosts]
    short = _slots_short(sizes, 0, layout.expert_count)
    if len(sizes) < 2 or short:
        return _refusal(spec, sizes, overhead_bytes, short)
    selections = deal(layout, sizes, ranked, hot_share)
    if coverage(selections, layout.expert_count) < copies_wanted(len(sizes)):
        return _refusal(spec, sizes, overhead_bytes, 1)  # the greedy deal fell short
    shards = tuple(Replica((Assignment(w, 0, spec.n_layers),), experts=s)
                   for w, s in zip(hosts, selections, strict=True))
    need = {w: shard_need(spec, n, overhead_bytes) for w, n in zip(hosts, sizes, strict=True)}
    hot = hot_count(sizes, hot_share, ranked is not None, layout.expert_count)
    tokens = ranked.tokens if ranked else 0
    return ShardPlan(shards, need, ExpertDeal(round(hot / min(sizes), 4), tokens,
                                              shards_why(tokens)))


def shards_why(calibration_tokens: int) -> str:
    """Why a model is served by expert shards, and how its experts were dealt."""
    how = (f"calibrated over {calibration_tokens} tokens" if calibration_tokens
           else "an even deal, no calibration")
    return (f"expert shards ({how}): the model fits no worker whole, and shards exchange "
            "nothing per token where a layer split passes activations every token")


def added_layer(order: Sequence[int], held: Sequence[Sequence[int]], size: int, hot: int
                ) -> tuple[int, ...]:
    """One MoE layer of a shard added beside `held`: first the experts short of the copies
    wanted (fewest held first), then the `hot` best ranked, then the least held; ties by
    rank."""
    rank = {e: i for i, e in enumerate(order)}
    count = {e: sum(e in h for h in held) for e in order}
    least = sorted(order, key=lambda e: (count[e], rank[e]))
    short = [e for e in least if count[e] < copies_wanted(len(held) + 1)]
    chosen = list(dict.fromkeys([*short, *order[:hot], *least]))[:size]
    return tuple(sorted(chosen))


def grow_shards(spec: ModelSpec, shards: Sequence[Replica], free: Mapping[WorkerId, int],
                overhead_bytes: int, ranking: ExpertRanking | None = None,
                hot_share: float = DEFAULT_HOT_SHARE, max_shards: int = 0) -> list[Replica]:
    """Shards to add on workers that joined with room (most free first, at most up to
    `max_shards` in all; 0: no limit), each holding what raises the coverage most: the
    shards placed stay as they are (a re-deal would reload them all)."""
    layout = _layout(spec)
    ranked = usable_ranking(layout, ranking)
    hosts = {r.head.worker_id for r in shards}
    rooms = {w: experts_room(spec, f, overhead_bytes) for w, f in free.items() if w not in hosts}
    joining = sorted((w for w in rooms if rooms[w] > 0), key=lambda w: (-free[w], w))
    held = [r.experts for r in shards]
    added = []
    for worker in joining[:max(0, max_shards - len(held)) if max_shards else None]:
        size = rooms[worker]
        hot = int(hot_share * size) if ranked else 0
        even = tuple(range(layout.expert_count))
        selection = tuple(
            added_layer(ranked.layer_order(layer) if ranked else even,
                        [h[layer] for h in held], size, hot)
            for layer in range(layout.moe_layers))
        held.append(selection)
        added.append(Replica((Assignment(worker, 0, spec.n_layers),), experts=selection))
    return added
