"""Protobuf conversion of the mixture-of-experts parts of the mesh's records: a model's
expert layout, a shard's expert selection and how a placement dealt the experts.

Part of `convert` (which calls these and re-exports them), kept apart for size; like
it, parsing validates and raises InvalidRecord.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshllm.common.errors import InvalidRecord
from meshllm.common.moe import ExpertRanking, ExpertSelection, MoeLayout
from meshllm.common.types import ExpertDeal
from meshllm.v1 import mesh_pb2


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise InvalidRecord(what)


def moe_to_pb(layout: MoeLayout) -> mesh_pb2.MoeLayout:
    return mesh_pb2.MoeLayout(
        expert_count=layout.expert_count, expert_used_count=layout.expert_used_count,
        moe_layers=layout.moe_layers, trunk_bytes=layout.trunk_bytes,
        bytes_per_expert=layout.bytes_per_expert,
        router_bytes_per_expert=layout.router_bytes_per_expert,
        shared_expert_bytes=layout.shared_expert_bytes)


def moe_from_pb(model_id: str, arch: str, m: mesh_pb2.MoeLayout) -> MoeLayout:
    _require(m.expert_count > 0, f"model {model_id}: MoE layout without experts")
    _require(1 <= m.expert_used_count <= m.expert_count,
             f"model {model_id}: {m.expert_used_count} experts used of {m.expert_count}")
    _require(m.moe_layers > 0, f"model {model_id}: MoE layout without MoE layers")
    _require(m.router_bytes_per_expert * m.expert_count <= m.trunk_bytes,
             f"model {model_id}: router rows outweigh the trunk")
    return MoeLayout(arch, m.expert_count, m.expert_used_count, m.moe_layers, m.trunk_bytes,
                     m.bytes_per_expert, m.router_bytes_per_expert, m.shared_expert_bytes)


def selection_to_pb(selection: ExpertSelection) -> list[mesh_pb2.ExpertList]:
    return [mesh_pb2.ExpertList(experts=list(layer)) for layer in selection]


def selection_from_pb(model_id: str, layers: Sequence[mesh_pb2.ExpertList]) -> ExpertSelection:
    """A shard's experts: every layer non-empty, as long as the others, no repeats."""
    selection = tuple(tuple(layer.experts) for layer in layers)
    if not selection:
        return ()
    width = len(selection[0])
    for i, layer in enumerate(selection):
        _require(len(layer) == width and width > 0,
                 f"placement {model_id}: a shard's MoE layer {i} holds {len(layer)} experts, "
                 f"layer 0 holds {width}")
        _require(len(set(layer)) == len(layer),
                 f"placement {model_id}: a shard lists an expert twice in MoE layer {i}")
    return selection


def deal_to_pb(deal: ExpertDeal) -> mesh_pb2.ExpertDeal:
    return mesh_pb2.ExpertDeal(hot_share=deal.hot_share,
                               calibration_tokens=deal.calibration_tokens, why=deal.why)


def deal_from_pb(model_id: str, m: mesh_pb2.ExpertDeal) -> ExpertDeal:
    _require(0.0 <= m.hot_share <= 1.0,
             f"placement {model_id}: expert hot share {m.hot_share} outside 0..1")
    return ExpertDeal(m.hot_share, m.calibration_tokens, m.why)


def ranking_to_pb(r: ExpertRanking) -> mesh_pb2.ExpertRanking:
    return mesh_pb2.ExpertRanking(
        model_digest=r.model_digest, tokens=r.tokens, seconds=r.seconds,
        layers=[mesh_pb2.ExpertCounts(counts=layer) for layer in r.counts])


def ranking_from_pb(m: mesh_pb2.ExpertRanking) -> ExpertRanking:
    digest = m.model_digest
    _require(len(digest) == 64 and all(c in "0123456789abcdef" for c in digest),
             f"expert ranking: bad model_digest {digest[:80]!r}")
    counts = tuple(tuple(layer.counts) for layer in m.layers)
    _require(bool(counts), f"expert ranking {digest[:12]}: no layers")
    _require(len({len(layer) for layer in counts}) == 1 and len(counts[0]) > 0,
             f"expert ranking {digest[:12]}: layers count different experts")
    _require(m.seconds >= 0, f"expert ranking {digest[:12]}: negative seconds")
    return ExpertRanking(digest, counts, m.tokens, m.seconds)
