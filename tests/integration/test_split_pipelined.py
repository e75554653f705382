"""Two batches in flight on a split (docs/split-latency.md section 4, scheme A): one model
over a ggml RPC stage, two llama contexts on it decoding from two threads, with today's
RPC client and with the pipelined one (a request with a reply releases the socket, the
replies are read back in order).

Real processes: a stage server with gemma3-270m's last 9 layers and a head
(bench/split_pipelined_head.py) with the rest. With the deterministic kernels greedy
decoding does not depend on which sequences share a batch, so two contexts of 4 must give
exactly the tokens of one context of 8, and those of each prompt decoded alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.split_pipelined import PROMPTS, PipelinedHead
from bench.split_procs import start_stage

TOKENS = 24


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One stage server; the heads below take turns on it (it serves one at a time)."""
    proc, port = start_stage(Path(tmp_path_factory.mktemp("stage")), threads=1)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def decode(endpoint: str, contexts: int, pipelined: bool, alone: bool = False
           ) -> list[list[int]]:
    head = PipelinedHead([endpoint], contexts=contexts, pipelined=pipelined, threads=1)
    try:
        if alone:
            return [head.run([p], TOKENS)["tokens"][0] for p in PROMPTS]
        first = list(head.run(PROMPTS, TOKENS)["tokens"])
        # again on the same contexts (cleared caches, graphs the stage has seen)
        assert head.run(PROMPTS, TOKENS)["tokens"] == first
        return first
    finally:
        head.close()


@pytest.fixture(scope="module")
def one_context(endpoint: str) -> list[list[int]]:
    tokens = decode(endpoint, 1, False)
    assert len(tokens) == len(PROMPTS) and all(len(t) == TOKENS for t in tokens)
    return tokens


@pytest.mark.integration
def test_one_context_of_eight_equals_each_prompt_alone(endpoint: str,
                                                       one_context: list[list[int]]) -> None:
    assert decode(endpoint, 1, False, alone=True) == one_context


@pytest.mark.integration
@pytest.mark.parametrize("pipelined", [False, True], ids=["todays-client", "pipelined"])
def test_two_contexts_of_four_equal_one_context_of_eight(endpoint: str, pipelined: bool,
                                                         one_context: list[list[int]]) -> None:
    assert decode(endpoint, 2, pipelined) == one_context
