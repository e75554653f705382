"""Speculative decoding on a split model: the head drafts, the stages verify.

Real processes: a ggml RPC stage server with gemma3-270m's last 9 layers and a head engine
(bench/split_head.py) with the rest, behind a proxy that parses ggml's RPC requests.
Greedy output with n-gram speculation must be exactly plain decoding's, token for token,
and a verification step (the last token plus its drafts) must cross to the stage in one
graph computation, so one round trip, whatever the number of drafted tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.split_procs import HeadProcess, start_stage
from bench.split_profile import ParsingProxy

REPEATING = "The quick brown fox jumps over the lazy dog. " * 6
PROMPTS = (REPEATING, "Write a detailed essay about the history of the printing press.",
           "1, 2, 3, 4, 5, 6, 7, 8,", "def add(a, b):\n    return a + b\n\ndef add(a, b):")
TOKENS = 32


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ParsingProxy]:
    proc, port = start_stage(Path(tmp_path_factory.mktemp("stage")), threads=1)
    try:
        yield ParsingProxy(port)
    finally:
        proc.kill()
        proc.wait()


def through_split(proxy: ParsingProxy, speculative: str, prompts: tuple[str, ...]
                  ) -> tuple[dict[str, object], int]:
    """(the head's run, graph computations on the stage during it)."""
    head = HeadProcess([f"127.0.0.1:{proxy.port}"], [9], speculative=speculative,
                       threads=1, slots=4)
    try:
        proxy.reset()
        result = head.run(prompts, TOKENS)
        tally = proxy.reset()
    finally:
        head.close()
    return result, tally.commands["GRAPH_COMPUTE"] + tally.commands["GRAPH_RECOMPUTE"]


@pytest.mark.integration
def test_greedy_speculation_through_a_split_equals_plain_decoding(stage: ParsingProxy) -> None:
    plain, _ = through_split(stage, "none", PROMPTS)
    spec, _ = through_split(stage, "ngram", PROMPTS)
    assert all(len(t) == TOKENS for t in plain["tokens"])  # type: ignore[attr-defined]
    assert spec["tokens"] == plain["tokens"]
    assert spec["accepted"] > 0  # type: ignore[operator]  # drafts were verified and kept


@pytest.mark.integration
def test_a_verification_step_is_one_round_trip_to_the_stage(stage: ParsingProxy) -> None:
    result, computes = through_split(stage, "ngram", (REPEATING,))
    assert result["accepted"] > 0  # type: ignore[operator]
    assert result["steps"] < TOKENS  # type: ignore[operator]  # kept drafts saved steps
    assert computes == result["steps"]
