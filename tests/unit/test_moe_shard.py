"""Expert surgery on the synthetic MoE file, checked byte by byte (no llama.cpp here; the
real model runs in tests/batch/test_real_moe_shard.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from meshllm.common.gguf import GgufHeader, read_header
from meshllm.common.models import materialize
from meshllm.common.moe import (
    InvalidExpertSelection,
    UnsupportedMoeLayout,
    moe_layout,
    shard_bytes,
)
from meshllm.worker.moe_shard import write_shard

from tests.support.moe_gguf import MoeSpec, moe_model

SPEC = MoeSpec(n_expert_used=3)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.getbasetemp() / "moe-models"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="module")
def model(models_dir: Path) -> Path:
    return moe_model(models_dir, SPEC)


def tensor_data(path: Path, header: GgufHeader, name: str) -> bytes:
    info = header.tensors[name]
    assert info.nbytes is not None
    with path.open("rb") as f:
        f.seek(header.data_start + info.offset)
        return f.read(info.nbytes)


def expert_rows(data: bytes, count: int, experts: Sequence[int]) -> bytes:
    stride = len(data) // count
    return b"".join(data[e * stride:(e + 1) * stride] for e in experts)


def test_synthetic_layout(model: Path) -> None:
    layout = moe_layout(read_header(model))
    assert layout is not None
    assert (layout.arch, layout.expert_count, layout.expert_used_count) == ("llama", 8, 3)
    assert layout.moe_layers == SPEC.n_layer
    assert layout.bytes_per_expert == SPEC.n_layer * 3 * SPEC.n_embd * SPEC.n_ff * 2  # F16
    assert layout.router_bytes_per_expert == SPEC.n_layer * SPEC.n_embd * 4            # F32
    assert shard_bytes(layout, 8) == sum(read_header(model).tensor_bytes.values())


def test_all_experts_in_order_is_the_same_file(model: Path, tmp_path: Path) -> None:
    shard = tmp_path / "all.gguf"
    write_shard(model, shard, range(8))
    assert shard.read_bytes() == model.read_bytes()


@pytest.mark.parametrize("experts", [[7, 3, 1, 0, 5, 2, 6, 4], [0, 1, 2, 3], [6, 2], [5]])
def test_every_tensor_is_copied_or_cut(model: Path, tmp_path: Path,
                                       experts: list[int]) -> None:
    shard = tmp_path / "shard.gguf"
    written = write_shard(model, shard, experts)
    src, dst = read_header(model), read_header(shard)
    assert list(dst.tensors) == list(src.tensors)
    assert dst.get_int("llama.expert_count") == len(experts) == written.expert_count
    assert dst.get_int("llama.expert_used_count") == min(3, len(experts))
    assert dst.array_lengths == src.array_lengths  # the tokenizer came along
    for name, info in src.tensors.items():
        cut = "_exps." in name or ".ffn_gate_inp." in name
        expected = tensor_data(model, src, name)
        if cut:
            expected = expert_rows(expected, 8, experts)
            assert dst.tensors[name].dims == (*info.dims[:-1], len(experts))
        assert tensor_data(shard, dst, name) == expected, name
    layout, sub = moe_layout(src), moe_layout(dst)
    assert layout is not None and sub is not None
    assert model.stat().st_size - shard.stat().st_size == (
        shard_bytes(layout, 8) - shard_bytes(layout, len(experts)))
    assert sub.bytes_per_expert == layout.bytes_per_expert
    assert sum(dst.tensor_bytes.values()) == shard_bytes(layout, len(experts))
    assert written.file_bytes == shard.stat().st_size


@pytest.mark.parametrize("selection", [
    ((7, 3, 1, 0, 5, 2, 6, 4), (0, 1, 2, 3, 4, 5, 6, 7), (4, 5, 6, 7, 0, 1, 2, 3)),
    ((0, 1, 2), (5, 6, 7), (2, 4, 7)),
    ((6,), (0,), (3,)),
])
def test_each_layer_keeps_its_own_experts(model: Path, tmp_path: Path,
                                          selection: tuple[tuple[int, ...], ...]) -> None:
    shard = tmp_path / "layers.gguf"
    written = write_shard(model, shard, selection)
    assert written.experts == selection and written.expert_count == len(selection[0])
    src, dst = read_header(model), read_header(shard)
    assert dst.get_int("llama.expert_count") == len(selection[0])
    for name in src.tensors:
        expected = tensor_data(model, src, name)
        if "_exps." in name or ".ffn_gate_inp." in name:
            expected = expert_rows(expected, 8, selection[int(name.split(".")[1])])
        assert tensor_data(shard, dst, name) == expected, name
    layout = moe_layout(src)
    assert layout is not None
    assert sum(dst.tensor_bytes.values()) == shard_bytes(layout, len(selection[0]))


@pytest.mark.parametrize(("selection", "words"), [
    (((0, 1), (2, 3)), "2 layers of experts; the model has 3"),
    (((0, 1), (2, 3), (4,)), "every layer of a shard must hold as many"),
])
def test_bad_selections(model: Path, tmp_path: Path, selection: tuple[tuple[int, ...], ...],
                        words: str) -> None:
    with pytest.raises(InvalidExpertSelection, match=words):
        write_shard(model, tmp_path / "bad.gguf", selection)
    assert list(tmp_path.iterdir()) == []


def test_shared_experts_stay(models_dir: Path, tmp_path: Path) -> None:
    source = moe_model(models_dir, MoeSpec(n_layer=1, shared_experts=True))
    shard = tmp_path / "shexp.gguf"
    write_shard(source, shard, [4, 1])
    src, dst = read_header(source), read_header(shard)
    layout = moe_layout(src)
    assert layout is not None and layout.shared_expert_bytes > 0
    shexp = [name for name in src.tensors if "_shexp" in name]
    assert len(shexp) == 3
    for name in shexp:
        assert tensor_data(shard, dst, name) == tensor_data(source, src, name)


def test_progress_reaches_the_total(model: Path, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    written = write_shard(model, tmp_path / "p.gguf", [1, 2], lambda d, t: seen.append((d, t)))
    done = [d for d, _ in seen]
    assert done == sorted(done) and len(seen) > 1
    assert seen[-1] == (written.tensor_bytes, written.tensor_bytes)


@pytest.mark.parametrize(("experts", "words"), [
    ([], "empty"), ([0, 8], "out of range"), ([2, 2], "more than once")])
def test_bad_expert_lists(model: Path, tmp_path: Path, experts: list[int],
                          words: str) -> None:
    with pytest.raises(InvalidExpertSelection, match=words):
        write_shard(model, tmp_path / "bad.gguf", experts)
    assert list(tmp_path.iterdir()) == []


def test_dense_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedMoeLayout, match="dense model"):
        write_shard(materialize("gemma3-270m"), tmp_path / "dense.gguf", [0])


def test_expert_axis_not_outermost_is_refused(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    source = tmp_path / "bad-layout.gguf"
    writer = gguf.GGUFWriter(str(source), "llama")
    writer.add_expert_count(4)
    writer.add_expert_used_count(2)
    writer.add_tensor("blk.0.ffn_gate_inp.weight", np.zeros((4, 32), dtype=np.float32))
    # Experts on the middle axis (ggml dims [32, 4, 16]): no expert is one byte range.
    writer.add_tensor("blk.0.ffn_up_exps.weight", np.zeros((16, 4, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedMoeLayout, match=re.escape("blk.0.ffn_up_exps.weight")):
        write_shard(source, tmp_path / "out.gguf", [0, 1])
    assert not (tmp_path / "out.gguf").exists()


PEAK_RSS = """
import json, sys
from pathlib import Path
from meshllm.worker.moe_shard import write_shard

def hwm_kib():  # this process's own peak; ru_maxrss would include pytest's, from the fork
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1])

before = hwm_kib()
write_shard(Path(sys.argv[1]), Path(sys.argv[2]), [3, 1, 4, 0])
print(json.dumps({"before_kib": before, "after_kib": hwm_kib()}))
"""


def test_memory_stays_far_below_the_model(model: Path, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(model), str(tmp_path / "m.gguf")],
                         check=True, capture_output=True, text=True, cwd=REPO).stdout
    rss = json.loads(out)
    grown = (rss["after_kib"] - rss["before_kib"]) * 1024
    print(f"peak RSS grew {grown / 2**20:.1f} MiB cutting a {model.stat().st_size / 2**20:.0f}"
          " MiB model")
    assert grown < model.stat().st_size / 4
