"""Groups of slots in flight on a real split (engine/batch/groups.py): the head's slots as
four groups, each on its own llama.cpp context over the one model and on its own thread,
their requests pipelined over each stage's one connection.

Real processes: two ggml RPC stage servers with gemma3-270m's last 12 layers (a 3-stage
split) and the engine as a worker runs it (bench/split_head.py). With the deterministic
kernels greedy decoding does not depend on the context or the neighbours a sequence
has, so four groups of 2 must give exactly the tokens of one group of 8, speculation on
or off, twice in a row on the same contexts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.split_latency import PROMPTS
from bench.split_procs import HeadProcess, start_stage

TOKENS = 24
WORK = [*PROMPTS["fresh"][:5], *PROMPTS["repeats"][:3]]


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Two stage servers; the heads below take turns on them (each serves one at a time)."""
    stages = [start_stage(Path(tmp_path_factory.mktemp(f"stage{i}")), threads=1)
              for i in range(2)]
    try:
        yield [f"127.0.0.1:{port}" for _, port in stages]
    finally:
        for proc, _ in stages:
            proc.kill()
            proc.wait()


def decode(endpoints: list[str], groups: int, speculative: str) -> list[list[int]]:
    head = HeadProcess(endpoints, [6, 6], speculative=speculative, threads=1, slots=8,
                       groups=groups, link_rtt_ms=40.0 if groups > 1 else 0.0)
    try:
        first = head.run(WORK, TOKENS)["tokens"]
        assert head.run(WORK, TOKENS)["tokens"] == first  # again, on the contexts used
        return list(first)
    finally:
        head.close()


@pytest.fixture(scope="module")
def one_group(endpoints: list[str]) -> list[list[int]]:
    tokens = decode(endpoints, 1, "none")
    assert len(tokens) == len(WORK) and all(len(t) == TOKENS for t in tokens)
    return tokens


@pytest.mark.integration
@pytest.mark.parametrize("speculative", ["none", "ngram"])
def test_four_groups_give_the_tokens_of_one(endpoints: list[str], one_group: list[list[int]],
                                            speculative: str) -> None:
    assert decode(endpoints, 4, speculative) == one_group
