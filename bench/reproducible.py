"""Reproducible generation: what it costs and what it buys, in one run (issue 14).

The real batching engine (BatchEngine, 8 slots) on gemma3-270m, once with llama.cpp's
fastest kernels and once with the batch-invariant ones (BatchConfig.deterministic), each in
its own process (ggml reads its kernel switch once per process), alternating per round:

  agreement   10 prompts x 32 greedy tokens, each computed alone on a fresh engine (the
              reference), again (warm prefix cache), and inside a batch of 8 concurrent
              requests: how many match the reference token for token
  decode      aggregate tok/s at 1 and 8 streams (median round), and the ratio
              deterministic / fast measured in the same run

    .venv/bin/python bench/reproducible.py [--threads 2] [--rounds 3] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "common/src"), str(ROOT / "services/shard-worker/src")]
from meshllm.common.models import materialize  # noqa: E402
from meshllm.common.types import SamplingParams  # noqa: E402
from meshllm.worker.engine.batch import BatchConfig, BatchEngine, Delta, Event  # noqa: E402
from meshllm.worker.engine.batch.numerics import numerics_for  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a dark forest, there lived",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "List three colors and explain why each of them is important in painting:",
    "The meaning of life, according to most philosophers, is",
    "Water boils at",
    "Here is a short summary of the history of the Roman Empire. The city was founded",
    "In 1492,",
    "Question: What is the largest planet in the solar system? Answer:",
    "Translate to French: 'The weather is nice today.'\nFrench:",
]
MODES = ("fast", "deterministic")


def run_all(engine: BatchEngine, prompts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """All prompts submitted at once; the token ids each one produced."""
    done = threading.Semaphore(0)
    out: dict[str, list[int]] = {}

    def sink(rid: str) -> Any:
        def on(ev: Event) -> None:
            if isinstance(ev, Delta):
                out.setdefault(rid, []).extend(ev.token_ids)
            else:
                done.release()
        return on

    for i, p in enumerate(prompts):
        rid = f"r{time.monotonic_ns()}-{i}"
        out[rid] = []
        engine.submit(rid, engine.tokenize(p), SamplingParams(max_tokens=max_tokens,
                                                              temperature=0.0), sink(rid))
    for _ in prompts:
        done.acquire()
    return list(out.values())


def tok_s(engine: BatchEngine, streams: int, tokens: int) -> float:
    started = time.perf_counter()
    outs = run_all(engine, [f"Write a long story about {PROMPTS[i]}" for i in range(streams)],
                   tokens)
    return sum(len(o) for o in outs) / (time.perf_counter() - started)


def new_engine(mode: str, threads: int) -> BatchEngine:
    model = str(materialize("gemma3-270m"))
    e = BatchEngine(BatchConfig(model_path=model, n_ctx=4096, n_slots=8, n_threads=threads,
                                deterministic=mode == "deterministic"))
    e.start()
    return e


def agreement(mode: str, threads: int) -> dict[str, int]:
    solo = []
    for p in PROMPTS:  # a fresh engine per prompt: nothing cached, nothing beside it
        e = new_engine(mode, threads)
        solo.append(run_all(e, [p], 32)[0])
        e.stop()
    e = new_engine(mode, threads)
    warm = [run_all(e, [p], 32)[0] for p in PROMPTS for _ in range(2)][1::2]
    batched = run_all(e, PROMPTS[:8], 32) + run_all(e, PROMPTS[8:] + PROMPTS[:6], 32)[:2]
    e.stop()
    return {"warm": sum(a == b for a, b in zip(solo, warm, strict=True)),
            "batch8": sum(a == b for a, b in zip(solo, batched, strict=True))}


def speed(mode: str, threads: int, tokens: int) -> dict[str, float]:
    e = new_engine(mode, threads)
    # Warm-up on every slot: a slot's first request runs about 2 s slower (its KV stream's
    # first use), which would be measured as decode speed otherwise.
    run_all(e, [f"Say hello {i}" for i in range(8)], 8)
    out = {str(s): tok_s(e, s, tokens) for s in (1, 8)}
    e.stop()
    return out


def in_child(mode: str, what: str, threads: int, tokens: int) -> Any:
    """One measurement in a process of its own, started with the mode's kernel switch."""
    cmd = [sys.executable, __file__, "--child", mode, "--what", what, "--threads",
           str(threads), "--tokens", str(tokens)]
    env = {**os.environ, **numerics_for(mode == "deterministic").process_env()}
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--what", choices=("agree", "speed"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        result = (agreement(a.child, a.threads) if a.what == "agree"
                  else speed(a.child, a.threads, a.tokens))
        print(json.dumps(result))
        return
    agree = {mode: in_child(mode, "agree", a.threads, a.tokens) for mode in MODES}
    rounds: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for r in range(a.rounds):  # alternating: the machine's noise hits both modes alike
        for mode in MODES:
            rounds[mode].append(in_child(mode, "speed", a.threads, a.tokens))
            print(f"  round {r}: {mode:<14} {rounds[mode][-1]}", flush=True)
    speed_of = {mode: {s: statistics.median(x[s] for x in rounds[mode]) for s in ("1", "8")}
                for mode in MODES}
    for mode in MODES:
        print(f"{mode:<14} agree warm {agree[mode]['warm']}/{len(PROMPTS)} batch8 "
              f"{agree[mode]['batch8']}/{len(PROMPTS)}  decode 1 stream "
              f"{speed_of[mode]['1']:.1f} tok/s, 8 streams {speed_of[mode]['8']:.1f} tok/s")
    fast, det = speed_of["fast"], speed_of["deterministic"]
    print(f"deterministic / fast: 1 stream {det['1'] / fast['1']:.2f}, "
          f"8 streams {det['8'] / fast['8']:.2f}")


if __name__ == "__main__":
    main()
