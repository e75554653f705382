"""Expert rankings (what calibration finds), per-layer expert selections, the model digest
that keys both, and the ranking's protobuf round trip."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from meshllm.common import convert
from meshllm.common.errors import InvalidRecord
from meshllm.common.moe import (
    ExpertRanking,
    InvalidExpertSelection,
    MoeLayout,
    as_selection,
    model_digest,
    shard_metadata,
    validate_experts,
)
from meshllm.v1 import mesh_pb2

LAYOUT = MoeLayout("llama", 8, 2, 2, 10_000, 1_000, 10, 0)
DIGEST = "ab" * 32
RANKING = ExpertRanking(DIGEST, ((5, 9, 0, 9, 1, 1, 2, 3), (0, 0, 0, 0, 0, 0, 0, 30)), 15, 1.5)


@pytest.mark.parametrize(("layer", "order"), [
    (0, (1, 3, 0, 7, 6, 4, 5, 2)),   # ties (9, 9) and (1, 1) by index
    (1, (7, 0, 1, 2, 3, 4, 5, 6)),
])
def test_layer_order_most_chosen_first(layer: int, order: tuple[int, ...]) -> None:
    assert RANKING.layer_order(layer) == order
    assert RANKING.expert_count == 8


def test_ranking_layers_must_count_every_expert() -> None:
    with pytest.raises(InvalidExpertSelection, match="every layer"):
        ExpertRanking(DIGEST, ((1, 2), (1, 2, 3)), 3, 0.1)


@pytest.mark.parametrize(("experts", "expected"), [
    ([3, 1], ((3, 1), (3, 1))),
    (range(8), (tuple(range(8)),) * 2),
    (((0, 1), (6, 7)), ((0, 1), (6, 7))),
    ([[7, 0, 1], [2, 5, 4]], ((7, 0, 1), (2, 5, 4))),
])
def test_selections(experts: Sequence[int] | Sequence[Sequence[int]],
                    expected: tuple[tuple[int, ...], ...]) -> None:
    assert as_selection(LAYOUT, experts) == expected
    assert shard_metadata(LAYOUT, experts)["llama.expert_count"] == len(expected[0])


def test_validate_experts_returns_the_kind_it_was_given() -> None:
    assert validate_experts(LAYOUT, [2, 0]) == (2, 0)
    assert validate_experts(LAYOUT, [[2, 0], [1, 3]]) == ((2, 0), (1, 3))


@pytest.mark.parametrize(("selection", "words"), [
    (((0, 1),), "1 layers of experts; the model has 2 MoE layers"),
    (((0, 1), (2,)), r"hold \[1, 2\] experts"),
    (((0, 1), ()), r"\(MoE layer 1\); the list is empty"),
    (((0, 8), (1, 2)), r"\[8\] \(MoE layer 0\) are out of range"),
    (((0, 1), (2, 2)), r"\[2\] \(MoE layer 1\) are listed more than once"),
])
def test_bad_selections(selection: Sequence[Sequence[int]], words: str) -> None:
    with pytest.raises(InvalidExpertSelection, match=words):
        validate_experts(LAYOUT, selection)


def test_model_digest_is_remembered_and_follows_the_file(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(100))
    first = model_digest(model)
    assert first == "37f5ad95406e53abb9c0ca3329ed5c9089cb1363149321d1989b8da75ecc9b7b"
    sidecar = tmp_path / "m.gguf.sha256"
    assert sidecar.exists()
    # The sidecar is trusted while size and mtime match: a forged digest proves it is read.
    stat = model.stat()
    sidecar.write_text(sidecar.read_text().replace(first, "f" * 64))
    assert model_digest(model) == "f" * 64
    model.write_bytes(b"GGUF" + bytes(99) + b"x")  # same size, new mtime
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert model_digest(model) not in (first, "f" * 64)


def test_model_digest_where_the_sidecar_cannot_be_written(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"abc")
    (tmp_path / "m.gguf.sha256.partial").mkdir()  # fails for root too, unlike a chmod
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert model_digest(model) == expected
    assert model_digest(model) == expected
    assert not (tmp_path / "m.gguf.sha256").exists()


def test_ranking_round_trip() -> None:
    raw = convert.ranking_to_pb(RANKING).SerializeToString()
    assert convert.parse_ranking(raw) == RANKING


@pytest.mark.parametrize(("message", "problem"), [
    (mesh_pb2.ExpertRanking(model_digest="xyz", layers=[mesh_pb2.ExpertCounts(counts=[1])]),
     "bad model_digest"),
    (mesh_pb2.ExpertRanking(model_digest=DIGEST), "no layers"),
    (mesh_pb2.ExpertRanking(model_digest=DIGEST, layers=[mesh_pb2.ExpertCounts(counts=[1]),
                                                          mesh_pb2.ExpertCounts(counts=[1, 2])]),
     "different experts"),
    (mesh_pb2.ExpertRanking(model_digest=DIGEST, layers=[mesh_pb2.ExpertCounts()]),
     "different experts"),
])
def test_invalid_rankings_are_rejected(message: mesh_pb2.ExpertRanking, problem: str) -> None:
    with pytest.raises(InvalidRecord, match=problem):
        convert.ranking_from_pb(message)
