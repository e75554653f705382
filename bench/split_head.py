"""A split model's head (or the model whole) with batching and speculation, driven over stdin.

Loads gemma3-270m with its last layers on the given ggml RPC servers as the engine process
does, says "loaded", then for each JSON line {"prompts": [...], "max_tokens": N} runs
those prompts as concurrent greedy requests (an optional "link_rtt_ms" first tells the
draft tuner the stages' round trip) and prints a JSON line: the token ids of each,
time to first token and elapsed time of each, and the engine's step and draft counters
over the run. Used by bench/split_latency.py and tests/integration/test_split_speculative.py.

    split_head.py ENDPOINTS LAYERS [--speculative none|ngram] [--draft-max 4]
        [--threads 2] [--slots 8] [--link-rtt-ms 0] [--pad-drafts off|on] [--groups 1]

The engine runs on its own threads (one per group of slots, batch/groups.py), as in the
engine process; with groups the RPC connections are pipelined, as the engine loads them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from meshllm.common.models import materialize
from meshllm.common.types import SamplingParams
from meshllm.native import rpc
from meshllm.worker.engine.batch import (
    BatchConfig,
    BatchEngine,
    Delta,
    Event,
    Failed,
    Finished,
    LoadOptions,
)
from meshllm.worker.engine.batch.config import SpecMode


def load(args: argparse.Namespace) -> BatchEngine:
    rpc.ensure_backends()
    endpoints = [e for e in args.endpoints.split(",") if e]
    options = LoadOptions(repack=False)
    if endpoints:  # without stages: the same model whole, as the baseline
        rpc.add_rpc_servers(endpoints)
        if args.groups > 1:  # as the engine process loads a head with groups (loading.py)
            rpc.set_pipelined(endpoints)
        options = LoadOptions.split_head([int(x) for x in args.layers.split(",")],
                                         repack=False)
    return BatchEngine(BatchConfig(
        model_path=str(materialize("gemma3-270m")), n_ctx=args.slots * 512,
        n_slots=args.slots, n_threads=args.threads, prefix_reuse=False, load=options,
        spec_mode=SpecMode(args.speculative), draft_max=args.draft_max,
        link_rtt_s=args.link_rtt_ms / 1000, pad_drafts=args.pad_drafts == "on",
        groups=args.groups))


class Streams:
    """One run's requests as their events arrive, on the threads of their groups."""

    def __init__(self, n: int) -> None:
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.first, self.last = [0.0] * n, [0.0] * n
        self.failed: list[Failed] = []
        self.ended = threading.Event()
        self._open, self._lock = n, threading.Lock()

    def sink(self, i: int) -> Callable[[Event], None]:
        def on_event(event: Event) -> None:
            if isinstance(event, Delta) and event.token_ids:
                now = time.perf_counter()
                self.first[i] = self.first[i] or now
                self.last[i] = now
                self.tokens[i].extend(event.token_ids)
            elif isinstance(event, Failed):
                self.failed.append(event)
            if isinstance(event, Failed | Finished):
                with self._lock:
                    self._open -= 1
                    if not self._open:
                        self.ended.set()
        return on_event


def run(engine: BatchEngine, job: dict[str, Any], run_id: int) -> dict[str, Any]:
    prompts: list[str] = job["prompts"]
    streams = Streams(len(prompts))
    if "link_rtt_ms" in job:  # the link changed: what a worker sends its engine (SetLinkRtt)
        engine.set_link_rtt(job["link_rtt_ms"] / 1000)
    before = engine.stats()
    started = time.perf_counter()
    tokenized = [engine.tokenize(prompt) for prompt in prompts]
    with engine.burst():  # the streams start together, in one step
        for i, prompt_tokens in enumerate(tokenized):
            engine.submit(f"run{run_id}-{i}", prompt_tokens,
                          SamplingParams(max_tokens=job["max_tokens"], temperature=0.0),
                          streams.sink(i))
    streams.ended.wait()
    if streams.failed:
        raise streams.failed[0].error
    after = engine.stats()
    return {"tokens": streams.tokens, "ttft_s": [f - started for f in streams.first],
            "elapsed_s": max(streams.last) - started,
            "steps": after.steps - before.steps,
            "drafted": after.drafted_tokens - before.drafted_tokens,
            "accepted": after.accepted_tokens - before.accepted_tokens}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("endpoints", help="comma-separated RPC servers; empty: whole model")
    parser.add_argument("layers", help="comma-separated layer counts, one per server")
    parser.add_argument("--speculative", default="none", choices=("none", "ngram"))
    parser.add_argument("--draft-max", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--link-rtt-ms", type=float, default=0.0)
    parser.add_argument("--pad-drafts", choices=("on", "off"), default="off")
    parser.add_argument("--groups", type=int, default=1)
    args = parser.parse_args()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # as in the engine process: whatever llama.cpp prints stays off `out`
    engine = load(args)
    engine.grammars.warm_up()  # now, not on start()'s thread during the first runs
    engine.start()  # its threads, as in the engine process (one per group)
    print("loaded", file=out, flush=True)
    for run_id, line in enumerate(sys.stdin):
        print(json.dumps(run(engine, json.loads(line), run_id)), file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
