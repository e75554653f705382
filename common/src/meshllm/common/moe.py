"""Mixture-of-experts models seen from their GGUF header: which tensors are routed experts,
what the trunk weighs, what one expert weighs.

Pure: the planner sizes expert shards from this, the worker checks a file with it before
cutting one. Counting rules (they make `shard_bytes` exact for files whose expert slices are
alignment multiples, which real and synthetic models are):
- routed-expert tensors are `blk.N.<name>_exps.*` (`ffn_gate_exps`, `ffn_up_exps`,
  `ffn_down_exps`, `ffn_gate_up_exps`, their biases and scales); their outermost axis is the
  expert axis, so one expert is a contiguous byte range of each;
- the router is `blk.N.ffn_gate_inp.*` and `blk.N.exp_probs_b.*` (a per-expert bias): it
  belongs to the trunk, but its rows follow the experts, so a shard with fewer experts has a
  smaller router (`router_bytes_per_expert` per dropped expert);
- shared experts (`*_shexp`, `ffn_gate_inp_shexp`) and everything else are trunk.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshllm.common.errors import MeshError
from meshllm.common.gguf import GgufHeader, TensorInfo

_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.([A-Za-z0-9_]+)\.[A-Za-z0-9_]+$")
# Old Mixtral conversions stored one tensor per expert: blk.N.ffn_gate.E.weight
_PER_EXPERT_TENSOR = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)\.\d+\.weight$")
_ROUTER_NAMES = frozenset({"ffn_gate_inp", "exp_probs_b"})


class UnsupportedMoeLayout(MeshError):
    """A file that claims experts but whose expert tensors cannot be cut by experts, or a
    dense model where a mixture of experts was required. The message names the tensor or
    key at fault."""

    reason = "unsupported_moe_layout"


class InvalidExpertSelection(MeshError):
    """An expert list that no shard can hold: empty, out of range, or with duplicates."""

    reason = "invalid_expert_selection"


class TensorRole(enum.Enum):
    TRUNK = "trunk"
    SHARED_EXPERT = "shared_expert"  # part of the trunk
    ROUTER = "router"                # part of the trunk; rows cut with the experts
    EXPERT = "expert"                # routed experts, sliced along the outermost axis


def tensor_role(name: str) -> TensorRole:
    match = _BLOCK_TENSOR.match(name)
    if match is None:
        return TensorRole.TRUNK
    base = match.group(2)
    if "shexp" in base:
        return TensorRole.SHARED_EXPERT
    if base in _ROUTER_NAMES:
        return TensorRole.ROUTER
    if base.endswith("_exps"):
        return TensorRole.EXPERT
    return TensorRole.TRUNK


@dataclass(frozen=True)
class MoeLayout:
    arch: str
    expert_count: int
    expert_used_count: int
    moe_layers: int                # blocks that hold routed experts
    trunk_bytes: int               # stored bytes of every non-expert tensor (router, shared incl.)
    bytes_per_expert: int          # one routed expert, all layers
    router_bytes_per_expert: int   # one router row (and bias entry), all layers; in trunk_bytes
    shared_expert_bytes: int       # shared experts, all layers; in trunk_bytes

    @property
    def total_bytes(self) -> int:
        return self.trunk_bytes + self.expert_count * self.bytes_per_expert


def _per_expert_bytes(info: TensorInfo, expert_count: int) -> int:
    """The byte stride of one expert in a tensor whose outermost axis is the expert axis."""
    if not info.dims or info.dims[-1] != expert_count:
        raise UnsupportedMoeLayout(
            f"tensor {info.name} has dims {list(info.dims)}: its outermost dimension should be "
            f"the expert axis ({expert_count} experts)")
    nbytes = info.nbytes
    if nbytes is None:
        raise UnsupportedMoeLayout(
            f"tensor {info.name} has ggml type {info.ggml_type}, whose block size is unknown: "
            "its experts cannot be cut as byte ranges")
    return nbytes // expert_count


def _expert_counts(header: GgufHeader, arch: str, has_experts: bool) -> tuple[int, int] | None:
    count = header.get_int(f"{arch}.expert_count")
    used = header.get_int(f"{arch}.expert_used_count")
    if count <= 0:
        if has_experts:
            raise UnsupportedMoeLayout(
                f"the file has routed-expert tensors but no {arch}.expert_count")
        return None
    if not has_experts:
        raise UnsupportedMoeLayout(
            f"{arch}.expert_count is {count} but no tensor is named blk.N.*_exps: experts "
            "stored another way cannot be cut")
    if not 1 <= used <= count:
        raise UnsupportedMoeLayout(
            f"{arch}.expert_used_count is {used}, outside 1..{arch}.expert_count ({count})")
    return count, used


def moe_layout(header: GgufHeader) -> MoeLayout | None:
    """The model's expert structure, None for a dense model; raises UnsupportedMoeLayout
    for a mixture of experts whose experts cannot be cut by byte ranges."""
    arch = header.get_str("general.architecture")
    for name in header.tensors:
        if _PER_EXPERT_TENSOR.match(name):
            raise UnsupportedMoeLayout(
                f"tensor {name}: one tensor per expert (an old Mixtral conversion); "
                "re-convert the model with a current llama.cpp to merge them into *_exps")
    roles = {name: tensor_role(name) for name in header.tensors}
    counts = _expert_counts(header, arch, TensorRole.EXPERT in roles.values())
    if counts is None:
        return None
    count, used = counts
    trunk = per_expert = router_row = shared = 0
    layers: set[str] = set()
    for name, info in header.tensors.items():
        role = roles[name]
        if role is TensorRole.EXPERT:
            per_expert += _per_expert_bytes(info, count)
            layers.add(name.split(".")[1])
            continue
        trunk += header.tensor_bytes.get(name, info.nbytes or 0)
        if role is TensorRole.ROUTER:
            router_row += _per_expert_bytes(info, count)
        elif role is TensorRole.SHARED_EXPERT:
            shared += header.tensor_bytes.get(name, info.nbytes or 0)
    return MoeLayout(arch, count, used, len(layers), trunk, per_expert, router_row, shared)


def validate_experts(layout: MoeLayout, experts: Sequence[int]) -> tuple[int, ...]:
    """The expert list as a tuple, or InvalidExpertSelection saying what is wrong."""
    chosen = tuple(int(e) for e in experts)
    if not chosen:
        raise InvalidExpertSelection("a shard needs at least one expert; the list is empty")
    outside = sorted({e for e in chosen if not 0 <= e < layout.expert_count})
    if outside:
        raise InvalidExpertSelection(
            f"experts {outside} are out of range: the model has experts 0.."
            f"{layout.expert_count - 1}")
    if len(set(chosen)) != len(chosen):
        repeated = sorted({e for e in chosen if chosen.count(e) > 1})
        raise InvalidExpertSelection(f"experts {repeated} are listed more than once")
    return chosen


def shard_bytes(layout: MoeLayout, n_experts: int) -> int:
    """Tensor bytes of a shard holding `n_experts` routed experts: the trunk, with the
    router rows of the dropped experts taken out, plus the experts."""
    if not 1 <= n_experts <= layout.expert_count:
        raise InvalidExpertSelection(
            f"a shard holds 1..{layout.expert_count} experts, not {n_experts}")
    dropped = layout.expert_count - n_experts
    return (layout.trunk_bytes - dropped * layout.router_bytes_per_expert
            + n_experts * layout.bytes_per_expert)


def experts_that_fit(layout: MoeLayout, budget_bytes: int) -> int:
    """The most experts a shard within `budget_bytes` of weights can hold (0: not even the
    trunk with one expert fits)."""
    per = layout.bytes_per_expert + layout.router_bytes_per_expert
    base = layout.trunk_bytes - layout.expert_count * layout.router_bytes_per_expert
    return max(0, min(layout.expert_count, (budget_bytes - base) // per))


def shard_metadata(layout: MoeLayout, experts: Sequence[int]) -> Mapping[str, int]:
    """The metadata a shard with these experts carries in place of the original's."""
    kept = validate_experts(layout, experts)
    return {f"{layout.arch}.expert_count": len(kept),
            f"{layout.arch}.expert_used_count": min(layout.expert_used_count, len(kept))}
