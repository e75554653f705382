"""Constrained decoding: aggregate tok/s with a json_schema grammar on every stream vs the
same engine unconstrained, at 1 and 8 streams; schema compile time, first and cached; the
cost of one token mask over the vocabulary, llguidance vs llama.cpp's grammar sampler.

One run, one engine (gemma3-270m, BatchEngine, 8 slots): in each round the unconstrained
and the constrained cell run back to back (in alternating order), and the ratio is taken
within the round, so that load from elsewhere on the machine moves both alike; the median
ratio and the median tok/s of the rounds are shown. Each request is greedy, max_tokens
tokens, on a prompt that asks for a story as JSON; the schema's long "story" string keeps
both kinds of request generating to max_tokens.

    .venv/bin/python bench/constrained_decoding.py [--threads 2] [--max-tokens 64]
        [--streams 1,8] [--rounds 3] [--no-llamacpp]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "common/src"), str(ROOT / "services/shard-worker/src")]
from meshllm.common.models import materialize  # noqa: E402
from meshllm.common.types import Grammar, GrammarKind, SamplingParams  # noqa: E402
from meshllm.worker.engine.batch import BatchConfig, BatchEngine, Delta, Event  # noqa: E402
from meshllm.worker.engine.batch.grammar import GrammarState  # noqa: E402

TOPICS = ["the ocean", "a mountain town", "the printing press", "bees", "a lighthouse keeper",
          "the first computers", "winter in a city", "a long train journey"]
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "mood": {"enum": ["happy", "sad", "calm", "tense"]},
        "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
        "characters": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "story": {"type": "string"},
    },
    "required": ["title", "mood", "year", "characters", "story"],
    "additionalProperties": False,
}
GRAMMAR = Grammar(GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA))
# Text both grammars accept (llama.cpp's GBNF wants the schema's property order and at
# most one space or a newline and indentation between tokens), for the mask timings.
SAMPLE = json.dumps({
    "title": "The Lighthouse Keeper", "mood": "calm", "year": 1899,
    "characters": ["Ann", "Tom", "the gulls"],
    "story": "Every night Ann climbed the hundred steps, wound the clockwork and lit the "
             "lamp, and every morning Tom rowed out with bread, news and a jar of honey."})


def prompt_for(i: int) -> str:
    return (f"<start_of_turn>user\nWrite a short story about {TOPICS[i % len(TOPICS)]}, as "
            "a JSON object.<end_of_turn>\n<start_of_turn>model\n")


@dataclass(frozen=True)
class Cell:
    constrained: bool
    streams: int
    tok_s: float
    tokens: int
    stopped: int  # requests that ended before max_tokens


def run_cell(eng: BatchEngine, constrained: bool, streams: int, max_tokens: int) -> Cell:
    """2 x streams requests, `streams` at a time, driven on this thread."""
    tokens, stopped = 0, 0
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    started = time.perf_counter()
    for wave in range(2):
        done: dict[str, int] = {}

        def sink(ev: Event, done: dict[str, int] = done) -> None:
            if isinstance(ev, Delta):
                done[ev.request_id] = done.get(ev.request_id, 0) + ev.tokens

        for i in range(streams):
            eng.submit(f"w{wave}-{i}", eng.tokenize(prompt_for(i)), sampling, sink,
                       grammar=GRAMMAR if constrained else None)
        while eng.step():
            pass
        tokens += sum(done.values())
        stopped += sum(n < max_tokens for n in done.values())
    return Cell(constrained, streams, tokens / (time.perf_counter() - started), tokens, stopped)


def throughput(eng: BatchEngine, streams: list[int], rounds: int, max_tokens: int
               ) -> tuple[dict[tuple[bool, int], list[Cell]], int]:
    """Each kind's cells, round by round, and the constrained tokens of all rounds."""
    cells: dict[tuple[bool, int], list[Cell]] = {}
    for s in streams:  # warm-up: the prompts' KV lands in the prefix cache for both kinds
        for constrained in (False, True):
            run_cell(eng, constrained, s, max_tokens)
    for r in range(rounds):
        for s in streams:
            order = (False, True) if r % 2 == 0 else (True, False)
            for constrained in order:
                cell = run_cell(eng, constrained, s, max_tokens)
                cells.setdefault((constrained, s), []).append(cell)
                print(f"  round {r}: {'json_schema' if constrained else 'plain':<12}{s} "
                      f"streams {cell.tok_s:7.1f} tok/s ({cell.tokens} tokens)", flush=True)
    total = sum(c.tokens for (constrained, _), v in cells.items() if constrained for c in v)
    return cells, total


def compile_times(eng: BatchEngine) -> None:
    t = time.perf_counter()
    eng.grammars.compile(Grammar(GrammarKind.LARK, 'start: "x"'))
    print(f"\ngrammar tokenizer from the vocabulary (once per engine): "
          f"{1e3 * (time.perf_counter() - t):.0f} ms")
    first: list[float] = []
    cached: list[float] = []
    for n in range(5):  # a schema the cache has not seen, then the same one again
        g = Grammar(GrammarKind.JSON_SCHEMA, json.dumps({**SCHEMA, "title": f"v{n}"}))
        for times in (first, cached):
            t = time.perf_counter()
            eng.grammars.compile(g)
            times.append(time.perf_counter() - t)
    print(f"schema compile: first {1e3 * statistics.median(first):.2f} ms, cached "
          f"{1e3 * statistics.median(cached):.3f} ms (median of 5)")


def llguidance_masks(eng: BatchEngine, tokens: list[int]) -> tuple[float, float]:
    """(median ms of one mask, median ms of 8 streams' masks in parallel)."""
    import llguidance
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par

    state = eng.grammars.compile(GRAMMAR)
    one: list[float] = []
    for token in tokens:
        t = time.perf_counter()
        state.mask()
        one.append(time.perf_counter() - t)
        state.consume(token)
    states = [eng.grammars.compile(GRAMMAR) for _ in range(8)]
    for k, s in enumerate(states):
        for token in tokens[: k * len(tokens) // 8]:
            s.consume(token)
    matchers = [(s._m, k) for k, s in enumerate(states)]
    executor = llguidance.LLExecutor(num_threads=eng.config.n_threads)
    masks = allocate_token_bitmask(8, eng._backend.n_vocab)
    par: list[float] = []
    for _ in range(20):
        t = time.perf_counter()
        fill_next_token_bitmask_par(executor, matchers, masks)
        par.append(time.perf_counter() - t)
    return 1e3 * statistics.median(one), 1e3 * statistics.median(par)


def llamacpp_masks(eng: BatchEngine, tokens: list[int]) -> tuple[float, float, int]:
    """(median ms of llama.cpp's grammar sampler over the whole vocabulary, median us of
    checking one token) along the same tokens, with its JSON-schema-to-GBNF converter
    (as far as its grammar agrees with llguidance's on them: the third number)."""
    import llama_cpp
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    vocab: Any = eng._backend._vocab  # type: ignore[attr-defined]
    n = eng._backend.n_vocab
    sampler = llama_cpp.llama_sampler_init_grammar(
        vocab, json_schema_to_gbnf(GRAMMAR.source).encode(), b"root")
    rec = np.zeros(n, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
    rec["id"] = np.arange(n)
    full_data, one_data = (llama_cpp.llama_token_data * n)(), (llama_cpp.llama_token_data * 1)()
    full = llama_cpp.llama_token_data_array(full_data, n, -1, False)
    one = llama_cpp.llama_token_data_array(one_data, 1, -1, False)
    full_t: list[float] = []
    one_t: list[float] = []
    for token in tokens:
        ctypes.memmove(full_data, rec.ctypes.data, rec.nbytes)
        full.size, one.size = n, 1
        one_data[0].id = ctypes.c_int32(token)
        for arr, times in ((full, full_t), (one, one_t)):
            t = time.perf_counter()
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(arr))
            times.append(time.perf_counter() - t)
        if one_data[0].logit == -np.inf:
            break  # the two JSON grammars differ here (whitespace): llama.cpp would abort
        llama_cpp.llama_sampler_accept(sampler, token)
    llama_cpp.llama_sampler_free(sampler)
    return 1e3 * statistics.median(full_t), 1e6 * statistics.median(one_t), len(full_t)


def mask_costs(eng: BatchEngine, with_llamacpp: bool) -> None:
    tokens = eng.tokenize(SAMPLE, add_bos=False)
    one, par = llguidance_masks(eng, tokens)
    n = eng._backend.n_vocab
    print(f"\nmask over {n} tokens, along a {len(tokens)}-token JSON text:")
    print(f"  llguidance: {one:.3f} ms per token; 8 streams in parallel {par:.3f} ms per step")
    if with_llamacpp:
        full, check, n = llamacpp_masks(eng, tokens)
        print(f"  llama.cpp grammar sampler: {full:.2f} ms per token (whole vocabulary), "
              f"{check:.1f} us to check one token; 8 streams ~{8 * full:.0f} ms per step "
              f"(over the first {n} tokens)")


def count_masks() -> Callable[[], int]:
    """Counts full masks computed from now on (the fast path skips most)."""
    calls = [0]
    real = GrammarState.mask

    def counted(self: GrammarState) -> Any:
        calls[0] += 1
        return real(self)

    GrammarState.mask = counted  # type: ignore[method-assign]
    return lambda: calls[0]


def report(cells: dict[tuple[bool, int], list[Cell]], streams: list[int], masks: int,
           constrained_tokens: int) -> None:
    print(f"\n{'grammar':<13}{'streams':>8}{'tok/s':>8}{'tokens':>8}{'ratio':>7}")
    for s in streams:
        plain, constrained = cells[(False, s)], cells[(True, s)]
        ratios = [c.tok_s / p.tok_s for p, c in zip(plain, constrained, strict=True)]
        for kind, runs in (("none", plain), ("json_schema", constrained)):
            ratio = statistics.median(ratios) if runs is constrained else 1.0
            print(f"{kind:<13}{s:>8}{statistics.median(c.tok_s for c in runs):>8.1f}"
                  f"{runs[0].tokens:>8}{ratio:>7.2f}")
        print(f"{'':<13}{'':>8}  ratio by round: {' '.join(f'{r:.2f}' for r in ratios)}")
    print(f"full masks computed: {masks} for {constrained_tokens} constrained tokens "
          f"({masks / max(constrained_tokens, 1):.2f} per token: the rest took the fast path)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-llamacpp", action="store_true")
    args = ap.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    eng = BatchEngine(BatchConfig(model_path=str(materialize("gemma3-270m")), n_ctx=8192,
                                  n_slots=8, n_threads=args.threads))
    compile_times(eng)
    mask_costs(eng, not args.no_llamacpp)
    masks = count_masks()
    print(f"\nthroughput, {args.max_tokens} tokens per request, greedy, 2 x streams requests")
    best, constrained_tokens = throughput(eng, streams, args.rounds, args.max_tokens)
    report(best, streams, masks(), constrained_tokens)


if __name__ == "__main__":
    main()
