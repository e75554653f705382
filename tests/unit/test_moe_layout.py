"""Recognising mixture-of-experts models from a GGUF header, and sizing shards: pure, on
headers built in memory, plus the real gemma3 file (dense)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
from meshllm.common.gguf import GGML_BLOCKS, GgufHeader, TensorInfo, read_header
from meshllm.common.models import materialize
from meshllm.common.moe import (
    InvalidExpertSelection,
    MoeLayout,
    TensorRole,
    UnsupportedMoeLayout,
    experts_that_fit,
    moe_layout,
    shard_bytes,
    shard_metadata,
    tensor_role,
    validate_experts,
)

F32, F16, Q8_0 = 0, 1, 8
E, FF, N_EXP = 64, 128, 8


Tensors = Sequence[tuple[str, tuple[int, ...], int]]


def header(tensors: Tensors, meta: Mapping[str, int], arch: str = "llama") -> GgufHeader:
    """A header whose stored sizes are the exact sizes padded to 32 bytes."""
    infos, stored, offset = {}, {}, 0
    for name, dims, ggml_type in tensors:
        info = TensorInfo(name, dims, ggml_type, offset)
        size = info.nbytes if info.nbytes is not None else 4096
        infos[name], stored[name] = info, -(-size // 32) * 32
        offset += stored[name]
    metadata: dict[str, int | float | bool | str] = {"general.architecture": arch}
    metadata.update({f"{arch}.{key}": value for key, value in meta.items()})
    return GgufHeader(3, len(tensors), metadata, {}, stored, infos)


def mixtral(layers: int = 2, exps_type: int = F16, extra: Sequence[
        tuple[str, tuple[int, ...], int]] = ()) -> list[tuple[str, tuple[int, ...], int]]:
    tensors = [("token_embd.weight", (E, 1000), F16), ("output_norm.weight", (E,), F32)]
    for i in range(layers):
        tensors += [(f"blk.{i}.attn_norm.weight", (E,), F32),
                    (f"blk.{i}.attn_q.weight", (E, E), F16),
                    (f"blk.{i}.ffn_gate_inp.weight", (E, N_EXP), F32),
                    (f"blk.{i}.ffn_gate_exps.weight", (E, FF, N_EXP), exps_type),
                    (f"blk.{i}.ffn_up_exps.weight", (E, FF, N_EXP), exps_type),
                    (f"blk.{i}.ffn_down_exps.weight", (FF, E, N_EXP), exps_type)]
    return tensors + list(extra)


TRUNK_2 = E * 1000 * 2 + E * 4 + 2 * (E * 4 + E * E * 2 + E * N_EXP * 4)
CASES: dict[str, tuple[Tensors, dict[str, int], MoeLayout]] = {
    "mixtral f16": (mixtral(), dict(expert_count=8, expert_used_count=2),
                    MoeLayout("llama", 8, 2, 2, TRUNK_2, 2 * 3 * E * FF * 2, 2 * E * 4, 0)),
    "mixtral q8_0 experts": (
        mixtral(exps_type=Q8_0), dict(expert_count=8, expert_used_count=2),
        MoeLayout("llama", 8, 2, 2, TRUNK_2, 2 * 3 * E * FF // 32 * 34, 2 * E * 4, 0)),
    "shared experts are trunk": (
        mixtral(extra=[("blk.0.ffn_up_shexp.weight", (E, FF), F16),
                       ("blk.0.ffn_gate_inp_shexp.weight", (E,), F32)]),
        dict(expert_count=8, expert_used_count=2),
        MoeLayout("llama", 8, 2, 2, TRUNK_2 + E * FF * 2 + E * 4, 2 * 3 * E * FF * 2,
                  2 * E * 4, E * FF * 2 + E * 4)),
    "router bias rows follow experts": (
        mixtral(layers=1, extra=[("blk.0.exp_probs_b.bias", (N_EXP,), F32)]),
        dict(expert_count=8, expert_used_count=8),
        MoeLayout("llama", 8, 8, 1, E * 1000 * 2 + E * 4 + E * 4 + E * E * 2 + E * N_EXP * 4
                  + 32, 3 * E * FF * 2, E * 4 + 4, 0)),
}


@pytest.mark.parametrize("case", CASES)
def test_layout(case: str) -> None:
    tensors, meta, expected = CASES[case]
    assert moe_layout(header(tensors, meta)) == expected


def test_dense_model_is_none() -> None:
    dense = [("token_embd.weight", (E, 1000), F16), ("blk.0.ffn_up.weight", (E, FF), F16)]
    assert moe_layout(header(dense, {})) is None


def test_real_gemma3_is_dense() -> None:
    real = read_header(materialize("gemma3-270m"))
    assert moe_layout(real) is None
    # The tensor table read beside the sizes: exact sizes within the stored (padded) ones.
    assert len(real.tensors) == real.tensor_count
    for name, info in real.tensors.items():
        assert info.nbytes is not None
        assert 0 <= real.tensor_bytes[name] - info.nbytes < 32, name
    assert real.kv_end <= real.data_start


BAD: dict[str, tuple[Tensors, dict[str, int], str]] = {
    "expert axis not outermost": (
        [("blk.0.ffn_gate_inp.weight", (E, N_EXP), F32),
         ("blk.0.ffn_up_exps.weight", (E, N_EXP, FF), F16)],
        dict(expert_count=8, expert_used_count=2), "blk.0.ffn_up_exps.weight"),
    "one tensor per expert": (
        [("blk.0.ffn_gate_inp.weight", (E, N_EXP), F32),
         ("blk.0.ffn_gate.0.weight", (E, FF), F16)],
        dict(expert_count=8, expert_used_count=2), "old Mixtral"),
    "expert count without expert tensors": (
        [("blk.0.ffn_up.weight", (E, FF), F16)], dict(expert_count=8, expert_used_count=2),
        "no tensor is named"),
    "expert tensors without expert count": (mixtral(), {}, "no llama.expert_count"),
    "used above count": (mixtral(), dict(expert_count=8, expert_used_count=9), "outside"),
    "unknown type for experts": (
        mixtral(layers=1, exps_type=99), dict(expert_count=8, expert_used_count=2),
        "ggml type 99"),
}


@pytest.mark.parametrize("case", BAD)
def test_unsupported_layouts_say_why(case: str) -> None:
    tensors, meta, words = BAD[case]
    with pytest.raises(UnsupportedMoeLayout, match=words):
        moe_layout(header(tensors, meta))


LAYOUT = MoeLayout("llama", 8, 2, 2, 10_000, 1_000, 10, 0)


@pytest.mark.parametrize(("n", "expected"), [(8, 18_000), (4, 13_960), (1, 10_930)])
def test_shard_bytes(n: int, expected: int) -> None:
    assert shard_bytes(LAYOUT, n) == expected
    assert shard_bytes(LAYOUT, LAYOUT.expert_count) == LAYOUT.total_bytes


@pytest.mark.parametrize(("budget", "fits"), [(10_929, 0), (10_930, 1), (13_960, 4),
                                              (13_959, 3), (18_000, 8), (10**9, 8)])
def test_experts_that_fit(budget: int, fits: int) -> None:
    assert experts_that_fit(LAYOUT, budget) == fits
    if fits:
        assert shard_bytes(LAYOUT, fits) <= budget


@pytest.mark.parametrize(("experts", "words"), [
    ([], "empty"), ([0, 8], r"\[8\] are out of range"), ([-1], "out of range"),
    ([1, 2, 1], r"\[1\] are listed more than once")])
def test_bad_expert_lists(experts: list[int], words: str) -> None:
    with pytest.raises(InvalidExpertSelection, match=words):
        validate_experts(LAYOUT, experts)


@pytest.mark.parametrize("n", [0, 9])
def test_shard_bytes_outside_range(n: int) -> None:
    with pytest.raises(InvalidExpertSelection):
        shard_bytes(LAYOUT, n)


@pytest.mark.parametrize(("experts", "used"), [([7, 1, 3], 2), ([5], 1), (range(8), 2)])
def test_shard_metadata_lowers_used(experts: Sequence[int], used: int) -> None:
    assert shard_metadata(LAYOUT, experts) == {"llama.expert_count": len(experts),
                                              "llama.expert_used_count": used}


@pytest.mark.parametrize(("name", "role"), [
    ("blk.3.ffn_up_exps.weight", TensorRole.EXPERT),
    ("blk.3.ffn_gate_up_exps.weight", TensorRole.EXPERT),
    ("blk.3.ffn_down_exps.scale", TensorRole.EXPERT),
    ("blk.3.ffn_gate_inp.weight", TensorRole.ROUTER),
    ("blk.3.exp_probs_b.bias", TensorRole.ROUTER),
    ("blk.3.ffn_gate_inp_shexp.weight", TensorRole.SHARED_EXPERT),
    ("blk.3.ffn_down_shexp.weight", TensorRole.SHARED_EXPERT),
    ("blk.3.ffn_up.weight", TensorRole.TRUNK),
    ("token_embd.weight", TensorRole.TRUNK),
])
def test_tensor_roles(name: str, role: TensorRole) -> None:
    assert tensor_role(name) is role


def test_block_sizes_match_the_gguf_package() -> None:
    gguf = pytest.importorskip("gguf")
    assert {int(t): sizes for t, sizes in gguf.GGML_QUANT_SIZES.items()} == GGML_BLOCKS
