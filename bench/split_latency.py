"""A split of the real model across slow links, in one run: throughput and time to first
token with 0, 5, 20 and 50 ms added to each hop's round trip, against the same split at
0 ms and against the model whole, with speculation off and on.

gemma3-270m split in 2 (a head with 9 layers, the embeddings and the output, and one stage
with 9 layers) or 3 (6 + 6 + 6) over ggml RPC stage servers, each behind bench/proxy.py's
delay proxy (half the hop's delay each way). The head is bench/split_head.py, the engine
as a worker runs it, told the link's round trip as a worker measures it (draft lengths
follow it, engine/batch/draft_tuning.py). Workloads: 1 and 8 greedy streams, on a prompt
that repeats its context (the n-gram drafter's case) and on one that does not.

    .venv/bin/python bench/split_latency.py [--stages 2|3|both] [--delays 0,5,20,50]
        [--tokens 32] [--rounds 1] [--pad-drafts off|on|both] [--groups auto|N]

The n-gram head pads drafts as the engine does by default (off); `--pad-drafts both` adds
a third split head, n-gram with padded drafts ("ngram-pad"), interleaved with the others,
to measure what padding buys. `--groups` (auto by default) adds an n-gram head whose slots
run as groups in flight (engine/batch/groups.py), with as many groups as a worker loads on
a link of +20 ms a hop; its loads on every delay of the run are the same.

Targets (issue 20): at 20 ms per hop, 8 streams keep 0.8 of their 0 ms throughput and
one stream on the repetitive prompt keeps 0.6.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from meshllm.worker.engine.batch.groups import groups_for_link

from bench.proxy import DelayProxy
from bench.split_procs import HeadProcess, start_stage

REPEATING = ("Copy this list exactly. apples, pears, plums, grapes, melons, lemons, limes, "
             "figs, dates, kiwis. Again: apples, pears, plums, grapes, melons, lemons, limes,"
             " figs, dates, kiwis. Again:")
TOPICS = ("the printing press", "the steam engine", "the telegraph", "the bicycle",
          "the compass", "the microscope", "paper money", "the windmill")
PROMPTS = {
    "repeats": [REPEATING.replace("Copy", f"({i + 1}) Copy") for i in range(8)],
    "fresh": [f"Write a detailed essay about the history of {t}." for t in TOPICS],
}
LAYERS = {2: [9], 3: [6, 6]}  # per stage; the head keeps the rest with the output


@dataclass(frozen=True)
class Cell:
    tok_s: float   # aggregate generated tokens per second
    ttft_s: float  # median time to first token
    accepted: float  # drafted tokens kept per step


Key = tuple[str, int, int, str]  # (head: solo | a variant, delay ms, streams, prompt)


def variants(pad_drafts: str, groups: int = 0) -> dict[str, tuple[str, bool, int]]:
    """The split heads to run: name -> (speculative mode, drafts padded, groups of slots)."""
    heads = {"none": ("none", False, 1), "ngram": ("ngram", pad_drafts == "on", 1)}
    if pad_drafts == "both":
        heads["ngram-pad"] = ("ngram", True, 1)
    if groups > 1:
        heads[f"ngram-g{groups}"] = ("ngram", pad_drafts == "on", groups)
    return heads


def groups_for(stages: int, option: str) -> int:
    """--groups: auto is what a worker loads on a link of +20 ms a hop (batch/groups.py)."""
    if option != "auto":
        return int(option)
    hops = stages - 1
    return groups_for_link(8, 0.020 * hops, hops)
WORKLOADS = [(s, p) for s in (1, 8) for p in ("repeats", "fresh")]


def cell(runs: list[dict[str, Any]]) -> Cell:
    rates = [sum(map(len, r["tokens"])) / r["elapsed_s"] for r in runs]
    return Cell(statistics.median(rates),
                statistics.median(t for r in runs for t in r["ttft_s"]),
                sum(r["accepted"] for r in runs) / max(1, sum(r["steps"] for r in runs)))


def one_round(heads: dict[str, HeadProcess], proxies: dict[str, list[DelayProxy]],
              delays: list[int], hops: int, args: argparse.Namespace,
              runs: dict[Key, list[dict[str, Any]]]) -> None:
    """Every (delay, workload) on both split heads, and every workload solo, interleaved so
    that the machine's drifting load falls on all of them alike."""
    for streams, prompt in WORKLOADS:
        prompts = PROMPTS[prompt][:streams]
        runs.setdefault(("solo", 0, streams, prompt), []).append(
            heads["solo"].run(prompts, args.tokens))
        for delay in delays:
            for spec in variants(args.pad_drafts, args.groups_now):
                for p in proxies[spec]:
                    p.delay_s = delay / 2000  # half the round trip each way
                runs.setdefault((spec, delay, streams, prompt), []).append(
                    heads[spec].run(prompts, args.tokens, link_rtt_ms=delay * hops))


def measure(stages: int, delays: list[int], args: argparse.Namespace, root: Path
            ) -> dict[Key, Cell]:
    """Solo and the split with speculation off and on, each with its own stage servers."""
    servers, proxies, heads = [], {}, {}
    try:
        heads["solo"] = HeadProcess([], [], speculative="none",
                                    draft_max=8, threads=args.threads)
        for spec, (mode, pad, groups) in variants(args.pad_drafts, args.groups_now).items():
            mine = [start_stage(root / f"{stages}-{spec}-{i}", args.threads)
                    for i in range(stages - 1)]
            servers += mine
            proxies[spec] = [DelayProxy(("127.0.0.1", port)) for _, port in mine]
            heads[spec] = HeadProcess([f"127.0.0.1:{p.port}" for p in proxies[spec]],
                                      LAYERS[stages], speculative=mode, draft_max=8,
                                      threads=args.threads, pad_drafts=pad, groups=groups)
        for head in heads.values():
            head.run(PROMPTS["fresh"][:8], 4)  # warm: graphs, caches
        runs: dict[Key, list[dict[str, Any]]] = {}
        for r in range(args.rounds):
            one_round(heads, proxies, delays, stages - 1, args, runs)
            print(f"  {stages} stages: round {r + 1}/{args.rounds} done", flush=True)
        return {key: cell(value) for key, value in runs.items()}
    finally:
        for head in heads.values():
            head.close()
        for proc, _ in servers:
            proc.kill()


def report(stages: int, cells: dict[Key, Cell], delays: list[int], pad_drafts: str,
           groups: int) -> None:
    print(f"\n{stages}-stage split: aggregate tok/s (ratio to the split at 0 ms without"
          " speculation, ratio to solo without speculation), median TTFT ms; per added round"
          " trip per hop")
    print(f"  {'spec':<12}{'streams':>8} {'prompt':<8}" + "".join(
        f"{f'+{d} ms':>27}" for d in delays))
    for s, p in WORKLOADS:
        solo = cells[("solo", 0, s, p)]
        print(f"  {'solo':<12}{s:>8} {p:<8}{solo.tok_s:>9.1f}{'':>11}{solo.ttft_s * 1000:6.0f}")
    for spec in variants(pad_drafts, groups):
        for s, p in WORKLOADS:
            base = cells[("none", 0, s, p)].tok_s
            whole = cells[("solo", 0, s, p)].tok_s
            row = []
            for d in delays:
                c = cells[(spec, d, s, p)]
                row.append(f"{c.tok_s:6.1f} ({c.tok_s / base:4.2f},{c.tok_s / whole:4.2f})"
                           f" {c.ttft_s * 1000:6.0f}")
            print(f"  {spec:<12}{s:>8} {p:<8}" + "".join(f"{x:>27}" for x in row))
    kept = ", ".join(
        f"+{d}: {statistics.mean(cells[('ngram', d, s, p)].accepted for s, p in WORKLOADS):.2f}"
        for d in delays)
    print(f"  drafted tokens kept per step with ngram: {kept}")
    if 20 in delays:
        eight = min(cells[("ngram", 20, 8, p)].tok_s / cells[("ngram", 0, 8, p)].tok_s
                    for p in PROMPTS)
        one = cells[("ngram", 20, 1, "repeats")].tok_s / cells[("none", 0, 1, "repeats")].tok_s
        print(f"RESULT {stages} stages at +20 ms: 8 streams keep {eight:.2f} of their 0 ms"
              f" (target 0.8), one stream on the repeating prompt {one:.2f} of 0 ms without"
              " speculation (target 0.6)")
        if groups > 1:
            g = f"ngram-g{groups}"
            own = min(cells[(g, 20, 8, p)].tok_s / cells[(g, 0, 8, p)].tok_s for p in PROMPTS)
            one_group = min(cells[(g, 20, 8, p)].tok_s / cells[("ngram", 0, 8, p)].tok_s
                            for p in PROMPTS)
            print(f"RESULT {stages} stages at +20 ms with {groups} groups (as a worker loads"
                  f" on this link): 8 streams keep {own:.2f} of their own 0 ms, {one_group:.2f}"
                  " of one group's 0 ms (target 0.8)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", choices=("2", "3", "both"), default="2")
    parser.add_argument("--delays", default="0,5,20,50")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pad-drafts", choices=("off", "on", "both"), default="off",
                        help="pad the n-gram head's greedy drafts to fewer ubatches; both: "
                        "a third head with padding, to compare")
    parser.add_argument("--groups", default="auto",
                        help="a head with this many groups of slots beside the others (auto:"
                        " as a worker loads on +20 ms a hop; 0 or 1: none)")
    parser.add_argument("--threads", type=int, default=1,
                        help="per process (head, each stage); 2 on a quiet 2-core machine")
    args = parser.parse_args()
    delays = [int(d) for d in args.delays.split(",")]
    if delays[0] != 0:
        delays.insert(0, 0)
    stage_counts = [2, 3] if args.stages == "both" else [int(args.stages)]
    print(f"gemma3-270m, greedy, {args.tokens} tokens per stream, {args.threads} threads per"
          " process, "
          "deterministic kernels; stages on loopback behind a delay proxy", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for stages in stage_counts:
            args.groups_now = groups_for(stages, args.groups)
            report(stages, measure(stages, delays, args, Path(tmp)), delays, args.pad_drafts,
                   args.groups_now)
    return 0


if __name__ == "__main__":
    sys.exit(main())
