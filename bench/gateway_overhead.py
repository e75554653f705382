"""Decode speed and time to first token through the mesh vs llama-cpp-python directly.

Both run the same model (gemma3-270m) with the same threads in the same run, alternating
so that machine noise hits both alike. Prints medians and the ratios the foundation issue
targets: decode tok/s at least 0.95 of direct, under 15 ms extra time to first token.

    .venv/bin/python bench/gateway_overhead.py [--threads 1] [--rounds 5] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from meshllm.common.models import materialize

from tests.support.mesh import LocalMesh, MeshOptions

PROMPT = "Write a detailed essay about the history of the printing press."


@dataclass(frozen=True)
class Run:
    ttft_s: float
    decode_tok_s: float
    tokens: int


def measure(stream: Any, started: float) -> Run:
    first = last = 0.0
    tokens = 0
    for _ in stream:
        now = time.perf_counter()
        if tokens == 0:
            first = now
        last = now
        tokens += 1
    return Run(first - started, (tokens - 1) / (last - first), tokens)


def prompt(i: int) -> str:
    """A new prompt for every run, so that neither side reuses a cached prefix."""
    return f"Essay {i}. {PROMPT}"


def direct_run(llm: Any, max_tokens: int, i: int) -> Run:
    llm.reset()
    started = time.perf_counter()
    stream = llm.create_completion(prompt(i), max_tokens=max_tokens, temperature=0,
                                   stream=True)
    return measure((c for c in stream if c["choices"][0]["text"]), started)


def mesh_run(client: openai.OpenAI, max_tokens: int, i: int) -> Run:
    started = time.perf_counter()
    stream = client.completions.create(model="gemma3-270m", prompt=prompt(i),
                                       max_tokens=max_tokens, temperature=0, stream=True)
    return measure((c for c in stream if c.choices and c.choices[0].text), started)


def summarize(name: str, runs: list[Run]) -> tuple[float, float]:
    ttft = statistics.median(r.ttft_s for r in runs)
    speed = statistics.median(r.decode_tok_s for r in runs)
    print(f"  {name:<22} decode {speed:6.1f} tok/s   first token {ttft * 1000:6.1f} ms   "
          f"({runs[0].tokens} tokens x {len(runs)} runs)")
    return ttft, speed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    from llama_cpp import Llama

    llm = Llama(model_path=str(materialize("gemma3-270m")), n_ctx=4096, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        mesh = LocalMesh(Path(tmp), MeshOptions(workers=1, threads=args.threads,
                                                worker_memory="2GiB"))
        mesh.start()
        try:
            client = openai.OpenAI(base_url=mesh.base_url + "/v1", api_key="x")
            mesh_run(client, 8, -1)  # warm up both paths
            direct_run(llm, 8, -1)
            direct, through = [], []
            for i in range(args.rounds):
                direct.append(direct_run(llm, args.max_tokens, 1000 + i))
                through.append(mesh_run(client, args.max_tokens, 2000 + i))
        finally:
            mesh.stop()
    print(f"gemma3-270m Q4_K_M, {args.threads} thread(s), {args.max_tokens} tokens, greedy")
    d_ttft, d_speed = summarize("llama-cpp-python", direct)
    m_ttft, m_speed = summarize("mesh-llm gateway", through)
    print(f"RESULT decode ratio (mesh / direct): {m_speed / d_speed:.3f}   target >= 0.95")
    print(f"RESULT extra time to first token: {(m_ttft - d_ttft) * 1000:+.1f} ms   "
          f"target < 15 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
