"""Speculation's rules measured on a charged clock: the real model's tokens, a fixed cost per
step, so that the comparison is free of this machine's noise.

`split_latency.py` measures the whole thing on real processes, but its cells move 10-15%
between runs, more than the rules differ. Here the engine runs gemma3-270m whole, its
n-gram drafter drafting on the model's own greedy tokens, while the clock the engine
(and its draft tuner) reads is charged for each decode as a split over a link would
charge it: the link's round trip per ubatch llama.cpp makes (ubatch.count_ubatches), and
the step's compute for its rows from a table timed on this machine's CPU (batch-invariant
kernels, 1 thread, gemma3-270m: 1 row 18.8 ms, 2 rows 47.0, 3 rows 56.0, 5 rows 94.8, 9
rows 130.3, linear between, 8.9 ms a row beyond). Prefill is not charged (every rule
prefills alike). Tokens are identical under every rule (greedy; speculation never changes
them); only the charged time differs.

The workload is split_latency's: a prompt that repeats its context and one that does not,
1 and 8 streams, run one after the other on one engine, so that each request starts from
what the engine saw before (its prior): plain decoding against the engine's n-gram
speculation as the working tree has it. Deterministic: two versions of the engine's rules
compare exactly, run by run.

    .venv/bin/python bench/draft_policy.py [--rounds 2] [--tokens 32] [--delays 0,5,20]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from meshllm.common.models import materialize
from meshllm.common.types import SamplingParams
from meshllm.worker.engine.batch import BatchConfig, BatchEngine, Delta, Event, LoadOptions
from meshllm.worker.engine.batch.backend import LlamaBackend
from meshllm.worker.engine.batch.config import SpecMode
from meshllm.worker.engine.batch.draft import NgramDrafter
from meshllm.worker.engine.batch.ubatch import count_ubatches

from bench.split_latency import PROMPTS

ROWS_MS = ((1, 18.8), (2, 47.0), (3, 56.0), (5, 94.8), (9, 130.3))
BEYOND_MS = (130.3 - 94.8) / 4  # a row past the table


def compute_s(rows: int) -> float:
    """A decode's compute for `rows` rows, from ROWS_MS."""
    for (r0, t0), (r1, t1) in itertools.pairwise(ROWS_MS):
        if rows <= r1:
            return (t0 + (max(rows, r0) - r0) * (t1 - t0) / (r1 - r0)) / 1000
    return (ROWS_MS[-1][1] + (rows - ROWS_MS[-1][0]) * BEYOND_MS) / 1000


class ChargedClock:
    """The real backend, behind a clock charged per decode as a split over a link would."""

    def __init__(self, backend: LlamaBackend, rtt_s: float) -> None:
        self._b = backend
        self.rtt_s = rtt_s
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def decode(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int],
               outputs: Sequence[bool]) -> Any:
        if all(outputs):  # a decode step; a prompt's chunk outputs its last row only
            per_seq = [seqs.count(s) for s in range(max(seqs) + 1)]
            self.now += count_ubatches(per_seq) * self.rtt_s + compute_s(len(tokens))
        return self._b.decode(tokens, positions, seqs, outputs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._b, name)


@dataclass
class Run:
    tokens: int
    charged_s: float


def engine(rule: str, rtt_s: float) -> tuple[BatchEngine, ChargedClock]:
    config = BatchConfig(model_path=str(materialize("gemma3-270m")), n_ctx=8 * 512,
                         n_slots=8, n_threads=1, prefix_reuse=False,
                         load=LoadOptions(repack=False),
                         spec_mode=SpecMode.NONE if rule == "plain" else SpecMode.NGRAM,
                         link_rtt_s=rtt_s)
    backend = ChargedClock(LlamaBackend(config.model_path, config.context(config.n_batch),
                                        config.model_load), rtt_s)
    drafter = None if rule == "plain" else NgramDrafter(config.ngram_max, config.ngram_min)
    return BatchEngine(config, backend=backend, drafter=drafter,
                       clock=backend.clock), backend


def run(eng: BatchEngine, charged: ChargedClock, prompts: Sequence[str], tokens: int,
        tag: str) -> Run:
    got = [0]

    def sink(event: Event) -> None:
        if isinstance(event, Delta):
            got[0] += len(event.token_ids)

    started = charged.now
    for i, prompt in enumerate(prompts):
        eng.submit(f"{tag}-{i}", eng.tokenize(prompt),
                   SamplingParams(max_tokens=tokens, temperature=0.0), sink)
    while eng.step():
        pass
    return Run(got[0], charged.now - started)


JOBS = [(1, "repeats"), (1, "fresh"), (8, "repeats"), (8, "fresh")]


def measure(rule: str, rtt_s: float, rounds: int, tokens: int) -> dict[tuple[int, str], Run]:
    eng, charged = engine(rule, rtt_s)
    totals = {job: Run(0, 0.0) for job in JOBS}
    for r in range(rounds + 1):  # the first round warms the engine's estimates
        for streams, prompt in JOBS:
            done = run(eng, charged, PROMPTS[prompt][:streams], tokens, f"{r}-{prompt}")
            if r:
                totals[(streams, prompt)].tokens += done.tokens
                totals[(streams, prompt)].charged_s += done.charged_s
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--delays", default="0,5,20")
    args = parser.parse_args()
    print("gemma3-270m greedy, charged clock (CPU row costs, round trip per ubatch); "
          "tok/s of charged decode time, ratio to plain at the same delay")
    print(f"  {'delay':>5} {'streams':>7} {'prompt':8} {'plain':>7} {'n-gram':>14}")
    for delay in (float(d) for d in args.delays.split(",")):
        rates = {rule: {job: r.tokens / r.charged_s
                        for job, r in measure(rule, delay / 1000, args.rounds,
                                              args.tokens).items()}
                 for rule in ("plain", "ngram")}
        for job in JOBS:
            plain, ngram = rates["plain"][job], rates["ngram"][job]
            print(f"  {delay:5.0f} {job[0]:7d} {job[1]:8} {plain:7.1f} {ngram:7.1f} "
                  f"({ngram / plain:4.2f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
