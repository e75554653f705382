"""Two batches in flight on a 2-stage split (issue 20, docs/split-latency.md section 4,
scheme A steps 1 and 2): one llama context decoding 8 greedy streams ("one") against two
contexts on the same model, 4 streams each, decoded from two threads, with today's RPC
client ("two") and with the pipelined one ("two-pipelined"), at 0 and +20 ms per hop, in
one run.

gemma3-270m: a head (bench/split_pipelined_head.py) with 9 layers, the embeddings and the
output, and one ggml RPC stage server with the last 9 layers, behind bench/proxy.py's
delay proxy (half the hop's delay each way). Each variant has its own stage server (a
server serves one connection at a time); they run interleaved, in a new order each round,
so the machine's drifting load falls on all of them. Printed: aggregate tok/s, its ratio
to "one" at the same delay in the same round, the pipelined client against today's in the
same round, the bytes the head sent the stage per context step (two alternating graphs
are sent whole every step, see docs/split-latency.md section 4), and whether every
variant's tokens equal those of "one".

    .venv/bin/python bench/split_pipelined.py [--delays 0,20] [--tokens 32] [--rounds 8]
        [--streams 8] [--threads 1] [--two-threads]

`--two-threads` adds "one-2threads", one context with twice the threads: the two-context
head computes on two threads at once, and this is the one-context head given the same
cores. `--streams 16` compares one context of 16 with two of 8. `--stages 3` splits the
model in three (the head 6 layers, each stage 6), each stage behind its own delay proxy;
`--groups 2,4` measures, instead of the default variants, "one" against G contexts on the
pipelined client for each G (docs/split-latency.md section 6: more groups than cores hide
the round trips). Each variant is also given as a ratio to "one" at 0 ms in the same
round: what a user on the slow link gets against the split on a fast one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.proxy import DelayProxy
from bench.split_procs import start_stage

HEAD = Path(__file__).resolve().parent / "split_pipelined_head.py"
TOPICS = ("the printing press", "the steam engine", "the telegraph", "the bicycle",
          "the compass", "the microscope", "paper money", "the windmill")


def make_prompts(n: int) -> tuple[str, ...]:
    """n distinct prompts: the eight topics, numbered from the ninth on."""
    return tuple(("" if i < len(TOPICS) else f"({i + 1}) ") + "Write a detailed essay about"
                 f" the history of {TOPICS[i % len(TOPICS)]}." for i in range(n))


PROMPTS = make_prompts(8)
STAGE_LAYERS = {2: 9, 3: 6}  # per stage, by the split's number of stages (18 layers)


@dataclass(frozen=True)
class Variant:
    name: str
    contexts: int
    pipelined: bool
    threads: int  # per context


BASELINE = "one"


def variants(threads: int, two_threads: bool, groups: Sequence[int] = ()) -> list[Variant]:
    if groups:
        return [Variant(BASELINE, 1, False, threads)] + [
            Variant(f"{g}x-pipelined", g, True, threads) for g in groups if g > 1]
    found = [Variant(BASELINE, 1, False, threads), Variant("two", 2, False, threads),
             Variant("two-pipelined", 2, True, threads)]
    if two_threads:
        found.append(Variant("one-2threads", 1, False, 2 * threads))
    return found


def named(args: argparse.Namespace) -> list[Variant]:
    return variants(args.threads, args.two_threads, args.groups)


class PipelinedHead:
    """bench/split_pipelined_head.py in a child process; `endpoints` empty: model whole."""

    def __init__(self, endpoints: Sequence[str], *, contexts: int = 1, pipelined: bool = False,
                 threads: int = 1, slots: int = 8) -> None:
        layers = ",".join(str(STAGE_LAYERS[len(endpoints) + 1]) for _ in endpoints)
        self.proc = subprocess.Popen(
            [sys.executable, str(HEAD), ",".join(endpoints), layers, "--contexts",
             str(contexts), "--pipelined", "on" if pipelined else "off", "--threads",
             str(threads), "--slots", str(slots)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "loaded":
            self.close()
            raise RuntimeError(f"the head did not load: {line!r}")

    def run(self, prompts: Sequence[str], max_tokens: int) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"prompts": list(prompts),
                                          "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the head died (exit {self.proc.poll()})")
        return dict(json.loads(line))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@dataclass
class Sample:
    tok_s: float
    decode_tok_s: float   # tokens after the first over the slowest group's decode time
    bytes_per_step: float  # head to stage
    same_tokens: bool     # as the one-context run of the same round


def sample(result: dict[str, Any], sent: int, tokens: int, reference: list[list[int]]
           ) -> Sample:
    made = sum(map(len, result["tokens"]))
    steps = tokens  # a prefill and tokens - 1 decode steps per context
    groups = len(result["decode_s"])
    return Sample(made / result["elapsed_s"],
                  (made - len(result["tokens"])) / max(result["decode_s"]),
                  sent / (steps * groups), result["tokens"] == reference)


def one_round(heads: dict[str, PipelinedHead], proxies: dict[str, list[DelayProxy]],
              args: argparse.Namespace, samples: dict[tuple[str, int], list[Sample]],
              order: random.Random) -> None:
    """Every variant at every delay, in a new order each round, so that a burst of the other
    sessions' load does not always fall on the same variant."""
    prompts, tokens = make_prompts(args.streams), args.tokens
    for delay in args.delays:
        names = list(heads)
        order.shuffle(names)
        results = {}
        for name in names:
            for proxy in proxies[name]:
                proxy.delay_s = delay / 2000  # half the round trip each way
                proxy.reset()
            result = heads[name].run(prompts, tokens)
            results[name] = (result, sum(p.counters.to_server for p in proxies[name]))
        reference = results[BASELINE][0]["tokens"]
        for name, (result, sent) in results.items():
            samples.setdefault((name, delay), []).append(
                sample(result, sent, tokens, reference))


def measure(args: argparse.Namespace, root: Path) -> dict[tuple[str, int], list[Sample]]:
    servers, heads = [], {}
    proxies: dict[str, list[DelayProxy]] = {}
    try:
        for v in named(args):
            proxies[v.name] = []
            for stage in range(args.stages - 1):
                proc, port = start_stage(root / f"{v.name}-{stage}", args.threads)
                servers.append(proc)
                proxies[v.name].append(DelayProxy(("127.0.0.1", port)))
            heads[v.name] = PipelinedHead([f"127.0.0.1:{p.port}" for p in proxies[v.name]],
                                          contexts=v.contexts, pipelined=v.pipelined,
                                          threads=v.threads, slots=args.streams)
            heads[v.name].run(make_prompts(args.streams), 4)  # warm: graphs, buffers
        samples: dict[tuple[str, int], list[Sample]] = {}
        order = random.Random(args.seed)
        for r in range(args.rounds):
            one_round(heads, proxies, args, samples, order)
            print(f"  round {r + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.2f}",
                  flush=True)
        return samples
    finally:
        for head in heads.values():
            head.close()
        for proc in servers:
            proc.kill()
            proc.wait()


def report(samples: dict[tuple[str, int], list[Sample]], args: argparse.Namespace) -> None:
    names = [v.name for v in named(args)]
    fast = samples[(BASELINE, min(args.delays))]
    print("\naggregate tok/s (median over rounds); in brackets the ratio to"
          f" {BASELINE} in the same round (median, min-max over rounds); decode-only tok/s;"
          " KB head->stage per context step")
    for delay in args.delays:
        base = samples[(BASELINE, delay)]
        for name in names:
            runs = samples[(name, delay)]
            ratios = [s.tok_s / b.tok_s for s, b in zip(runs, base, strict=True)]
            same = all(s.same_tokens for s in runs)
            of_fast = [s.tok_s / b.tok_s for s, b in zip(runs, fast, strict=True)]
            print(f"  +{delay:>3} ms {name:<14}{statistics.median(s.tok_s for s in runs):7.1f}"
                  f" ({statistics.median(ratios):4.2f}, {min(ratios):4.2f}-{max(ratios):4.2f})"
                  f"  of {BASELINE} at +{min(args.delays)} ms {statistics.median(of_fast):4.2f}"
                  f"  decode {statistics.median(s.decode_tok_s for s in runs):6.1f}"
                  f"  {statistics.median(s.bytes_per_step for s in runs) / 1000:7.1f} KB/step"
                  f"  tokens {'equal' if same else 'DIFFER'}")
        if ("two", delay) not in samples:
            continue
        piped = [s.tok_s / b.tok_s for s, b in zip(samples[("two-pipelined", delay)],
                                                  samples[("two", delay)], strict=True)]
        print(f"  +{delay:>3} ms pipelined / today's client, same round:"
              f" {statistics.median(piped):4.2f} ({min(piped):4.2f}-{max(piped):4.2f})")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delays", default="0,20")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="per context and per stage")
    parser.add_argument("--streams", type=int, default=8, help="split in halves for 2x")
    parser.add_argument("--seed", type=int, default=0, help="of the order within a round")
    parser.add_argument("--two-threads", action="store_true",
                        help="add one context of 8 with twice the threads")
    parser.add_argument("--stages", type=int, choices=sorted(STAGE_LAYERS), default=2)
    parser.add_argument("--groups", default="", help="e.g. 2,4: one against G contexts")
    args = parser.parse_args()
    args.delays = [int(d) for d in args.delays.split(",")]
    args.groups = [int(g) for g in args.groups.split(",") if g]
    print(f"gemma3-270m, {args.stages}-stage split, {args.streams} greedy streams of"
          f" {args.tokens} tokens,"
          " deterministic"
          f" kernels, {args.threads} thread(s) per context and stage", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        report(measure(args, Path(tmp)), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
