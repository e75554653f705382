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
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard, cast, overload

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


ExpertSelection = tuple[tuple[int, ...], ...]
"""The experts a shard holds in each MoE layer, in block order: one tuple of expert indices
per layer (sorted, by convention), all of the same length."""


def _validate_list(layout: MoeLayout, experts: Sequence[int], where: str = "") -> tuple[int, ...]:
    chosen = tuple(int(e) for e in experts)
    if not chosen:
        raise InvalidExpertSelection(
            f"a shard needs at least one expert{where}; the list is empty")
    outside = sorted({e for e in chosen if not 0 <= e < layout.expert_count})
    if outside:
        raise InvalidExpertSelection(
            f"experts {outside}{where} are out of range: the model has experts 0.."
            f"{layout.expert_count - 1}")
    if len(set(chosen)) != len(chosen):
        repeated = sorted({e for e in chosen if chosen.count(e) > 1})
        raise InvalidExpertSelection(f"experts {repeated}{where} are listed more than once")
    return chosen


def _validate_selection(layout: MoeLayout,
                        selection: Sequence[Sequence[int]]) -> ExpertSelection:
    if len(selection) != layout.moe_layers:
        raise InvalidExpertSelection(
            f"the selection has {len(selection)} layers of experts; the model has "
            f"{layout.moe_layers} MoE layers: give one list per layer, or one list for all")
    chosen = tuple(_validate_list(layout, layer, f" (MoE layer {i})")
                   for i, layer in enumerate(selection))
    sizes = sorted({len(layer) for layer in chosen})
    if len(sizes) > 1:
        raise InvalidExpertSelection(
            f"the layers hold {sizes} experts: every layer of a shard must hold as many, "
            "since the file has one expert_count")
    return chosen


@overload
def validate_experts(layout: MoeLayout, experts: Sequence[int]) -> tuple[int, ...]: ...
@overload
def validate_experts(layout: MoeLayout,
                     experts: Sequence[Sequence[int]]) -> ExpertSelection: ...
def validate_experts(layout: MoeLayout, experts: Sequence[int] | Sequence[Sequence[int]]
                     ) -> tuple[int, ...] | ExpertSelection:
    """One expert list for every layer as a tuple, or a per-layer ExpertSelection as one;
    InvalidExpertSelection saying what is wrong."""
    if _is_selection(experts):
        return _validate_selection(layout, experts)
    return _validate_list(layout, cast("Sequence[int]", experts))


def _is_selection(experts: Sequence[int] | Sequence[Sequence[int]]
                  ) -> TypeGuard[Sequence[Sequence[int]]]:
    return len(experts) > 0 and isinstance(experts[0], Sequence)


def as_selection(layout: MoeLayout,
                 experts: Sequence[int] | Sequence[Sequence[int]]) -> ExpertSelection:
    """Validated, and one list per MoE layer: a single list stands for every layer."""
    if _is_selection(experts):
        return _validate_selection(layout, experts)
    flat = _validate_list(layout, cast("Sequence[int]", experts))
    return tuple(flat for _ in range(layout.moe_layers))


def expert_blocks(header: GgufHeader) -> tuple[int, ...]:
    """The block indices that hold routed experts, in order: MoE layer i is block
    expert_blocks(header)[i] (models with dense leading blocks number them apart)."""
    blocks = set()
    for name in header.tensors:
        match = _BLOCK_TENSOR.match(name)
        if match is not None and tensor_role(name) is TensorRole.EXPERT:
            blocks.add(int(match.group(1)))
    return tuple(sorted(blocks))


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


def shard_metadata(layout: MoeLayout, experts: Sequence[int] | Sequence[Sequence[int]]
                   ) -> Mapping[str, int]:
    """The metadata a shard with these experts (one list, or one per layer) carries in
    place of the original's."""
    kept = len(as_selection(layout, experts)[0])
    return {f"{layout.arch}.expert_count": kept,
            f"{layout.arch}.expert_used_count": min(layout.expert_used_count, kept)}


@dataclass(frozen=True)
class ExpertRanking:
    """How often the router chose each expert, per MoE layer, over a calibration text."""

    model_digest: str                    # model_digest(path) of the full model
    counts: tuple[tuple[int, ...], ...]  # [moe layer in block order][expert] selections
    tokens: int                          # calibration tokens evaluated
    seconds: float                       # time the calibration took

    def __post_init__(self) -> None:
        widths = {len(layer) for layer in self.counts}
        if len(widths) > 1:
            raise InvalidExpertSelection(
                f"ranking of {self.model_digest[:12]}: layers count {sorted(widths)} experts; "
                "every layer must count every expert")

    @property
    def expert_count(self) -> int:
        return len(self.counts[0]) if self.counts else 0

    def layer_order(self, layer: int) -> tuple[int, ...]:
        """The experts of MoE layer `layer`, most chosen first, ties by index."""
        counts = self.counts[layer]
        return tuple(sorted(range(len(counts)), key=lambda e: (-counts[e], e)))


_DIGEST_CHUNK = 8 << 20


def model_digest(path: Path) -> str:
    """The sha256 (hex) of the file, streamed. Remembered in a sidecar `<file>.sha256`
    keyed by the file's size and mtime, so a second call costs a stat; where the sidecar
    cannot be written (a read-only directory) it is computed each time."""
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    sidecar = path.with_name(path.name + ".sha256")
    try:
        cached = json.loads(sidecar.read_text())
        if {k: cached.get(k) for k in key} == key and isinstance(cached.get("sha256"), str):
            return str(cached["sha256"])
    except (OSError, ValueError, AttributeError):
        pass  # absent, unreadable or stale: compute it
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_DIGEST_CHUNK):
            digest.update(chunk)
    hexdigest = digest.hexdigest()
    try:
        partial = sidecar.with_name(sidecar.name + ".partial")
        partial.write_text(json.dumps({**key, "sha256": hexdigest}))
        partial.replace(sidecar)
    except OSError:
        pass  # a read-only model directory: the digest is still right, only not remembered
    return hexdigest


def expert_ranges(experts: Sequence[int]) -> str:
    """`0-4,6,9-10`: the experts, sorted, with each run of consecutive ones as a range."""
    runs: list[list[int]] = []
    for e in sorted(experts):
        if runs and e == runs[-1][-1] + 1:
            runs[-1].append(e)
        else:
            runs.append([e])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


# An expert list longer than this (as ranges) is cut short in words: a status line or a
# planner's why stays readable.
EXPERT_LIST_CHARS = 48


def expert_list(experts: Sequence[int]) -> str:
    """expert_ranges, or for a long list its count and first ranges: `70 experts (0-3,...)`."""
    listed = expert_ranges(experts)
    if len(listed) > EXPERT_LIST_CHARS:
        return f"{len(experts)} experts ({listed[:EXPERT_LIST_CHARS]}...)"
    return listed


def layer_runs(selection: ExpertSelection) -> list[tuple[str, tuple[int, ...]]]:
    """Each run of consecutive layers with the same experts, as (`layer 3` or
    `layers 0-2`, those experts), in layer order."""
    runs, start = [], 0
    for i in range(1, len(selection) + 1):
        if i < len(selection) and selection[i] == selection[start]:
            continue
        layers = f"layer {start}" if i - 1 == start else f"layers {start}-{i - 1}"
        runs.append((layers, selection[start]))
        start = i
    return runs
