"""The Responses API's overhead against chat completions for the same request.

The same conversation (one user turn, greedy, the same max tokens) goes through
/v1/chat/completions and /v1/responses, streamed and not, on one mesh in one run, the
four kinds interleaved in each round (in an order that alternates, so drift hits all
alike) and every request with a prompt of its own (no cached prefix). Prints median
wall time per request (and time to first text for the streamed ones) and the ratios;
the target is under 5% overhead (ratio < 1.05).

    .venv/bin/python bench/responses_overhead.py [--threads 1] [--rounds 7] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.mesh import LocalMesh, MeshOptions

MODEL = "gemma3-270m"
PROMPT = "Write a detailed essay about the history of the printing press."


@dataclass(frozen=True)
class Run:
    total_s: float
    first_text_s: float  # the whole request when not streamed
    tokens: int


Kind = Callable[[openai.OpenAI, str, int], Run]


def _first_text(stream: Iterator[Any], is_text: Callable[[Any], bool], started: float
                ) -> tuple[float, Any]:
    """When the first text came, and the last event (which carries the usage)."""
    first, last = 0.0, None
    for event in stream:
        if not first and is_text(event):
            first = time.perf_counter() - started
        last = event
    return first, last


def chat(client: openai.OpenAI, text: str, max_tokens: int) -> Run:
    started = time.perf_counter()
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                       max_tokens=max_tokens, temperature=0)
    total = time.perf_counter() - started
    assert r.usage is not None
    return Run(total, total, r.usage.completion_tokens)


def responses(client: openai.OpenAI, text: str, max_tokens: int) -> Run:
    started = time.perf_counter()
    r = client.responses.create(model=MODEL, input=text, max_output_tokens=max_tokens,
                                temperature=0)
    total = time.perf_counter() - started
    assert r.usage is not None
    return Run(total, total, r.usage.output_tokens)


def chat_stream(client: openai.OpenAI, text: str, max_tokens: int) -> Run:
    started = time.perf_counter()
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True})
    first, last = _first_text(stream, lambda c: bool(c.choices and c.choices[0].delta.content),
                              started)
    return Run(time.perf_counter() - started, first, last.usage.completion_tokens)


def responses_stream(client: openai.OpenAI, text: str, max_tokens: int) -> Run:
    started = time.perf_counter()
    stream = client.responses.create(model=MODEL, input=text, max_output_tokens=max_tokens,
                                     temperature=0, stream=True)
    first, last = _first_text(stream, lambda e: e.type == "response.output_text.delta",
                              started)
    return Run(time.perf_counter() - started, first, last.response.usage.output_tokens)


KINDS: dict[str, Kind] = {"chat": chat, "responses": responses,
                          "chat stream": chat_stream, "responses stream": responses_stream}


def rounds(client: openai.OpenAI, count: int, max_tokens: int) -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = {name: [] for name in KINDS}
    names = list(KINDS)
    for i in range(count):
        order = names if i % 2 == 0 else names[::-1]
        for j, name in enumerate(order):
            runs[name].append(KINDS[name](client, f"Essay {i}.{j}. {PROMPT}", max_tokens))
    return runs


def report(runs: dict[str, list[Run]]) -> None:
    medians = {}
    for name, done in runs.items():
        total = statistics.median(r.total_s for r in done)
        per_token = statistics.median(r.total_s / max(1, r.tokens) for r in done)
        first = statistics.median(r.first_text_s for r in done)
        medians[name] = (total, first, per_token)
        print(f"  {name:<17} {total * 1000:8.1f} ms per request  {per_token * 1000:6.2f} ms "
              f"per token   first text {first * 1000:7.1f} ms   "
              f"({statistics.median(r.tokens for r in done)} tokens, {len(done)} runs)")
    for plain in ("chat", "chat stream"):
        other = plain.replace("chat", "responses")
        ratio = medians[other][0] / medians[plain][0]
        token_ratio = medians[other][2] / medians[plain][2]
        print(f"RESULT {other} / {plain}: time {ratio:.3f}, time per token "
              f"{token_ratio:.3f}   target < 1.05")
    ttft = medians["responses stream"][1] - medians["chat stream"][1]
    print(f"RESULT responses stream extra time to first text: {ttft * 1000:+.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mesh = LocalMesh(Path(tmp), MeshOptions(workers=1, threads=args.threads,
                                                worker_memory="2GiB"))
        mesh.start()
        try:
            client = openai.OpenAI(base_url=mesh.base_url + "/v1", api_key="x")
            rounds(client, 1, 8)  # warm up every path
            runs = rounds(client, args.rounds, args.max_tokens)
        finally:
            mesh.stop()
    print(f"{MODEL}, {args.threads} thread(s), up to {args.max_tokens} tokens, greedy, "
          f"{args.rounds} interleaved rounds")
    report(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
