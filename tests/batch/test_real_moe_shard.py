"""Expert shards run by real llama.cpp (llama-cpp-python's low-level API as the worker
loads models, 1 thread) on the synthetic MoE model, F16 and Q8_0. Each model is a fresh
object, so greedy decoding is recomputed from scratch (deterministic, docs/FIELD-NOTES)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from meshllm.common.gguf import read_header
from meshllm.common.moe import moe_layout, shard_bytes
from meshllm.worker.moe_probe import ProbedModel
from meshllm.worker.moe_shard import write_shard

from tests.support.moe_gguf import MoeSpec, moe_model

pytestmark = pytest.mark.integration

PROMPTS = ("The capital of France is", "def fibonacci(n):")
N_TOKENS = 32
PERMUTATION = [7, 3, 1, 0, 5, 2, 6, 4]


def greedy(path: Path, prompt: str) -> list[int]:
    # Loaded as the worker loads (no weight repacking): llama.cpp 0.3.36 repacking Q8_0
    # experts segfaulted in the first decode on an AMX machine (moe_probe's docstring).
    with ProbedModel(path, n_ctx=256, threads=1) as llm:
        return llm.greedy(llm.tokenize(prompt), N_TOKENS)


@pytest.fixture(scope="module", params=["F16", "Q8_0"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.getbasetemp() / "moe-models"
    directory.mkdir(exist_ok=True)
    return moe_model(directory, MoeSpec(quant=request.param, n_expert_used=3))


@pytest.fixture(scope="module")
def full_output(model: Path) -> dict[str, list[int]]:
    return {prompt: greedy(model, prompt) for prompt in PROMPTS}


def shard(model: Path, tmp_path: Path, experts: Sequence[int] | Sequence[Sequence[int]]
          ) -> Path:
    path = tmp_path / f"shard-{'-'.join(map(str, experts))}.gguf".replace(" ", "")
    write_shard(model, path, experts)
    return path


def test_random_weights_give_varied_text(full_output: dict[str, list[int]]) -> None:
    for tokens in full_output.values():
        assert len(tokens) == N_TOKENS
        assert len(set(tokens)) > N_TOKENS // 2  # not one token, nor a short loop


def test_permuted_experts_give_identical_output(model: Path, tmp_path: Path,
                                                full_output: dict[str, list[int]]) -> None:
    permuted = shard(model, tmp_path, PERMUTATION)
    assert {prompt: greedy(permuted, prompt) for prompt in PROMPTS} == full_output


def test_the_router_rows_must_follow_their_experts(model: Path, tmp_path: Path,
                                                   full_output: dict[str, list[int]]) -> None:
    """The control for the test above: the same permuted experts behind the original,
    unpermuted router give another text, so equality there is no accident."""
    permuted = shard(model, tmp_path, PERMUTATION)
    src, dst = read_header(model), read_header(permuted)
    with model.open("rb") as original, permuted.open("r+b") as patched:
        for name, info in src.tensors.items():
            if ".ffn_gate_inp." in name:
                original.seek(src.data_start + info.offset)
                patched.seek(dst.data_start + dst.tensors[name].offset)
                patched.write(original.read(info.nbytes or 0))
    assert greedy(permuted, PROMPTS[0]) != full_output[PROMPTS[0]]


def test_all_experts_in_order_give_identical_output(model: Path, tmp_path: Path,
                                                    full_output: dict[str, list[int]]) -> None:
    same = shard(model, tmp_path, range(8))
    assert {prompt: greedy(same, prompt) for prompt in PROMPTS} == full_output


@pytest.mark.parametrize(("experts", "used"), [([0, 1, 2, 3], 3), ([6, 2], 2)])
def test_subsets_load_run_and_shrink(model: Path, tmp_path: Path, experts: list[int],
                                     used: int) -> None:
    from llama_cpp import Llama

    path = shard(model, tmp_path, experts)
    layout = moe_layout(read_header(model))
    assert layout is not None
    saved = shard_bytes(layout, 8) - shard_bytes(layout, len(experts))
    assert model.stat().st_size - path.stat().st_size == saved
    assert saved == (8 - len(experts)) * (layout.bytes_per_expert
                                          + layout.router_bytes_per_expert)
    llm = Llama(str(path), n_ctx=256, n_threads=1, verbose=False)
    assert llm.metadata["llama.expert_count"] == str(len(experts))
    assert llm.metadata["llama.expert_used_count"] == str(used)
    llm.close()
    tokens = greedy(path, PROMPTS[0])
    assert len(tokens) == N_TOKENS


LAYER_PERMUTATIONS = ((7, 3, 1, 0, 5, 2, 6, 4), (0, 1, 2, 3, 4, 5, 6, 7),
                      (2, 6, 4, 0, 7, 5, 3, 1))


def test_per_layer_permutations_give_identical_output(
        model: Path, tmp_path: Path, full_output: dict[str, list[int]]) -> None:
    permuted = shard(model, tmp_path, LAYER_PERMUTATIONS)
    assert {prompt: greedy(permuted, prompt) for prompt in PROMPTS} == full_output


@pytest.mark.parametrize("selection", [((0, 1, 2, 3), (4, 5, 6, 7), (1, 3, 5, 7)),
                                       ((6, 2), (0, 7), (3, 4))])
def test_per_layer_subsets_load_run_and_shrink(model: Path, tmp_path: Path,
                                               selection: tuple[tuple[int, ...], ...]) -> None:
    path = shard(model, tmp_path, selection)
    layout = moe_layout(read_header(model))
    assert layout is not None
    n = len(selection[0])
    assert model.stat().st_size - path.stat().st_size == (8 - n) * (
        layout.bytes_per_expert + layout.router_bytes_per_expert)
    tokens = greedy(path, PROMPTS[0])
    assert len(tokens) == N_TOKENS
    # Another deal per layer of as many experts computes another model.
    uniform = shard(model, tmp_path, selection[0])
    assert greedy(uniform, PROMPTS[0]) != tokens
