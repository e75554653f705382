"""A stage's weight cache filled from the model file (stage_cache), the layers every worker
keeps warm (spare_cache), and the hash our library exports for it."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest
from meshllm.common.gguf import GgufHeader, TensorInfo
from meshllm.common.meshview import MeshSnapshot
from meshllm.common.types import (
    Assignment,
    LoadState,
    ModelId,
    ModelSpec,
    ModelState,
    Placement,
    Replica,
    WorkerId,
    WorkerInfo,
)
from meshllm.worker.spare_cache import SpareLayers, stage_layers
from meshllm.worker.stage_cache import CacheEntry, entry_file, layer_entries, prime

F32, Q4_K, UNKNOWN = 0, 12, 999


def fnv1a(data: bytes) -> int:
    """ggml-rpc's cache hash, written out: the reference our exported one must equal."""
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def header(*tensors: tuple[str, int, tuple[int, ...]]) -> GgufHeader:
    infos, offset = {}, 0
    for name, ggml_type, dims in tensors:
        infos[name] = TensorInfo(name, dims, ggml_type, offset)
        offset += 1 << 20
    return GgufHeader(3, len(infos), {}, {}, tensors=infos, data_start=4096)


HEADER = header(("token_embd.weight", Q4_K, (256, 4096)),   # outside the layers
                ("blk.0.attn_q.weight", Q4_K, (256, 1024)),
                ("blk.1.attn_q.weight", Q4_K, (256, 1024)),
                ("blk.1.attn_norm.weight", F32, (256,)),     # 1 KiB: sent in full, no hash
                ("blk.1.odd.weight", UNKNOWN, (256, 1024)),  # size unknown: cannot be named
                ("blk.2.ffn_up.weight", F32, (256, 256)),
                ("blk.12.ffn_up.weight", F32, (256, 256)))


@pytest.mark.parametrize(("start", "end", "names"), [
    (0, 1, ["blk.0.attn_q.weight"]),
    (1, 2, ["blk.1.attn_q.weight"]),
    (1, 3, ["blk.1.attn_q.weight", "blk.2.ffn_up.weight"]),
    (2, 12, ["blk.2.ffn_up.weight"]),    # blk.12 is not blk.1 or blk.2
    (12, 13, ["blk.12.ffn_up.weight"]),
    (3, 12, []),
])
def test_a_stage_is_asked_for_its_layers_big_tensors(start: int, end: int,
                                                     names: list[str]) -> None:
    entries = layer_entries(HEADER, start, end)
    assert [e.name for e in entries] == names
    for entry in entries:
        info = HEADER.tensors[entry.name]
        assert (entry.offset, entry.nbytes) == (4096 + info.offset, info.nbytes)


def test_priming_writes_each_entry_once_under_its_hash(tmp_path: Path) -> None:
    model, cache = tmp_path / "model.gguf", tmp_path / "cache"
    data = os.urandom(300_000)
    model.write_bytes(data)
    entries = (CacheEntry("a", 0, 100_000), CacheEntry("b", 100_000, 200_000))
    calls: list[int] = []

    def hasher(address: int, size: int) -> int:
        calls.append(size)
        return fnv1a(ctypes.string_at(address, size))

    first = prime(model, cache, entries, hasher)
    assert (first.entries, first.written, first.bytes_written) == (2, 2, 300_000)
    for entry in entries:
        chunk = data[entry.offset:entry.offset + entry.nbytes]
        assert entry_file(cache, fnv1a(chunk)).read_bytes() == chunk
    calls.clear()
    again = prime(model, cache, entries, hasher)
    assert (again.written, calls) == (0, [])  # remembered by the index: no hashing
    damaged = entry_file(cache, fnv1a(data[:100_000]))
    damaged.write_bytes(b"short")
    assert prime(model, cache, entries, hasher).written == 1
    assert damaged.read_bytes() == data[:100_000]
    assert not list(cache.glob("*.tmp"))


def test_our_library_hashes_as_the_stage_server_names_its_files() -> None:
    from meshllm.native.rpc import cache_hash

    for size in (0, 1, 7, 65_536, 100_003):
        data = np.frombuffer(os.urandom(size) or b"\0", dtype=np.uint8)[:size]
        assert cache_hash(int(data.ctypes.data), size) == fnv1a(data.tobytes())


SPEC = ModelSpec(ModelId("m"), "m.gguf", 1, 18, 64, 1, "gemma3", 64)


def snapshot(*replicas: Replica, head_state: LoadState = LoadState.READY) -> MeshSnapshot:
    head = WorkerInfo(WorkerId("w1"), "a:1", "cpu", 1 << 30, 1, 1.0,
                      models=(ModelState(ModelId("m"), head_state),))
    return MeshSnapshot(workers={head.worker_id: head}, models={SPEC.model_id: SPEC},
                        placements={SPEC.model_id: Placement(SPEC.model_id, replicas, 0)})


def split(*bounds: tuple[str, int, int], retiring: bool = False,
          experts: tuple[tuple[int, ...], ...] = ()) -> Replica:
    return Replica(tuple(Assignment(WorkerId(w), a, b) for w, a, b in bounds), retiring,
                   experts)


@pytest.mark.parametrize(("mesh", "wanted"), [
    (snapshot(split(("w1", 0, 5), ("w2", 5, 18))), [SpareLayers(SPEC, 5, 18)]),
    (snapshot(split(("w1", 0, 5), ("w2", 5, 9), ("w3", 9, 18))), [SpareLayers(SPEC, 5, 18)]),
    (snapshot(split(("w1", 0, 18))), []),                          # whole: nothing to take over
    (snapshot(split(("w1", 0, 5), ("w2", 5, 18)), head_state=LoadState.LOADING), []),
    (snapshot(split(("w1", 0, 5), ("w2", 5, 18), retiring=True)), []),
    (snapshot(split(("w1", 0, 18), experts=((0, 1),))), []),       # an expert shard
])
def test_every_worker_keeps_the_stages_of_serving_splits_warm(
        mesh: MeshSnapshot, wanted: list[SpareLayers]) -> None:
    assert list(stage_layers(mesh)) == wanted
