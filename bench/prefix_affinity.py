"""Prefix-affinity routing against round-robin, in one run on one mesh: multi-turn chats
over two replicas of the real model, TTFT and the share of prompt tokens served from a
reused KV cache.

Two gateways follow the same etcd and route to the same two workers: the mesh's own
(routing that learns: bans, load, prefix affinity) and a round-robin one (this file run
with --round-robin-gateway: the same gateway, its routing replaced by strict rotation).
Each phase runs a few conversations interleaved turn by turn (an odd number, so that
rotation does not pin each to one replica by accident), streamed through the official
`openai` client, one request at a time; phases alternate between the two gateways, each
with conversations of its own (distinct system prompts: no cache shared across phases).

    .venv/bin/python bench/prefix_affinity.py [--conversations 3] [--turns 6] [--rounds 2]
        [--max-tokens 24] [--system-words 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import openai
from openai.types.chat import ChatCompletionMessageParam

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "common/src"), str(ROOT / "services/gateway/src")]
from meshllm.common.types import WorkerInfo  # noqa: E402
from meshllm.gateway import __main__ as gateway_main  # noqa: E402
from meshllm.gateway.backend import MeshBackend  # noqa: E402
from meshllm.gateway.routing import Affinity, Decision, RequestKey  # noqa: E402
from meshllm.v1 import worker_pb2, worker_pb2_grpc  # noqa: E402

from tests.support.mesh import LocalMesh, MeshOptions, get_json  # noqa: E402
from tests.support.procs import Proc, free_port, python_module, wait_until  # noqa: E402

MODEL = "gemma3-270m"
TOPICS = ["lighthouses", "bees", "the printing press", "glaciers", "early clocks",
          "silk roads", "tidal mills", "comets", "paper making", "canal locks", "violins",
          "windmills"]
FACTS = ["It began long ago.", "Many people worked on it.", "Its parts were made by hand.",
         "Travellers wrote about it.", "Its use spread along the coasts.",
         "Later versions were larger.", "Some examples survive in museums.",
         "It changed daily life in small ways."]


class RoundRobinBackend(MeshBackend):
    """The baseline: ready replicas in strict rotation, blind to load, bans and prefixes
    (the retry loop is the gateway's own: a failed replica still passes to the next)."""

    _turn = 0

    def _decide(self, key: RequestKey, replicas: Sequence[WorkerInfo]) -> Decision:
        decision = super()._decide(key, replicas)
        ordered = sorted(replicas, key=lambda w: w.worker_id)
        self._turn += 1
        k = self._turn % len(ordered) if ordered else 0
        return replace(decision, order=tuple(ordered[k:] + ordered[:k]), affinity=Affinity.NONE)


def serve_round_robin(argv: list[str]) -> int:
    setattr(gateway_main, "MeshBackend", RoundRobinBackend)  # noqa: B010 (the one seam)
    return gateway_main.main(argv)


@dataclass(frozen=True)
class Turn:
    policy: str
    turn: int
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int
    replica: str  # the worker whose prompt-token counter moved ("?" if not one)


def system_prompt(topic: str, words: int) -> str:
    """Opens with its topic, so that two conversations share only the chat template's
    first tokens (see `fill_slots`)."""
    sentences, i = [f"{topic.capitalize()}: you are a museum guide who only talks of it."], 0
    while sum(len(s.split()) for s in sentences) < words:
        sentences.append(f"Fact {i + 1} about {topic}: {FACTS[i % len(FACTS)]}")
        i += 1
    return " ".join(sentences)


def ask(client: openai.OpenAI, messages: list[ChatCompletionMessageParam], max_tokens: int
        ) -> tuple[float, str, int, int]:
    """(TTFT, answer, prompt tokens, cached tokens) of one streamed chat turn."""
    started, ttft, pieces, usage = time.perf_counter(), None, [], None
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if ttft is None and (choice.delta.content or choice.finish_reason):
                ttft = time.perf_counter() - started
            pieces.append(choice.delta.content or "")
    assert usage is not None, "no usage in the stream"
    details = usage.prompt_tokens_details
    cached = (details.cached_tokens or 0) if details else 0
    return ttft or time.perf_counter() - started, "".join(pieces), usage.prompt_tokens, cached


def prompt_counters(ports: dict[str, int]) -> dict[str, int]:
    counters = {}
    for name, port in ports.items():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stats = worker_pb2_grpc.ShardWorkerStub(channel).GetStats(
                worker_pb2.GetStatsRequest(), timeout=5)
        counters[name] = stats.prompt_tokens_total
    return counters


def moved(before: dict[str, int], after: dict[str, int]) -> str:
    names = [n for n in after if after[n] > before.get(n, 0)]
    return names[0] if len(names) == 1 else "?"


def phase(mesh: LocalMesh, base_url: str, policy: str, topics: list[str],
          args: argparse.Namespace) -> list[Turn]:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=300)
    chats: list[list[ChatCompletionMessageParam]] = [
        [{"role": "system", "content": system_prompt(t, args.system_words)}] for t in topics]
    turns = []
    for turn in range(args.turns):
        for chat in chats:
            chat.append({"role": "user",
                         "content": f"Question {turn + 1}: tell me one more detail, please."})
            before = prompt_counters(mesh.worker_ports)
            ttft, answer, prompt, cached = ask(client, chat, args.max_tokens)
            replica = moved(before, prompt_counters(mesh.worker_ports))
            chat.append({"role": "assistant", "content": answer})
            turns.append(Turn(policy, turn, ttft, prompt, cached, replica))
    return turns


def fill_slots(base_url: str, replicas: int = 2, slots: int = 4) -> None:
    """One request in every slot of every replica at once (round-robin spreads them
    evenly), so that no slot stays empty. The engine gives a new prompt the free slot
    sharing its longest prefix, and an empty slot shares none: from a fresh start every
    conversation would take the one used slot (sharing the template's first tokens),
    evicting the others' KV whatever the routing. With every slot filled, prompts that
    share only those tokens tie, and the least recently used slot is taken instead."""
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=300)
    barrier = threading.Barrier(replicas * slots)

    def one(i: int) -> None:
        barrier.wait()
        client.chat.completions.create(model=MODEL, max_tokens=16, temperature=0, messages=[
            {"role": "user", "content": f"{i} warm-up: count slowly from one to twenty."}])

    with ThreadPoolExecutor(replicas * slots) as pool:
        list(pool.map(one, range(replicas * slots)))


def start_round_robin_gateway(mesh: LocalMesh) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc("gateway-round-robin", python_module(
        "bench.prefix_affinity", "--round-robin-gateway", "--etcd", mesh.etcd_url,
        "--listen", f"127.0.0.1:{port}"), mesh.root / "logs", env={"PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if not proc.alive():
            raise RuntimeError("the round-robin gateway exited:\n" + proc.log_tail())
        try:
            models = get_json(url + "/api/status")["models"]
        except OSError:
            return False
        return any(m["model_id"] == MODEL and m["ready_replicas"] >= 2 for m in models)

    wait_until(ready, 60, "the round-robin gateway")
    return proc, url


def summary(turns: list[Turn]) -> tuple[float, float, float, float]:
    """(median TTFT, mean TTFT, cached share) of turns after the first, and cached share
    of all turns."""
    later = [t for t in turns if t.turn > 0]
    cached = sum(t.cached_tokens for t in later) / max(1, sum(t.prompt_tokens for t in later))
    overall = sum(t.cached_tokens for t in turns) / max(1, sum(t.prompt_tokens for t in turns))
    ttfts = [t.ttft_s for t in later]
    return statistics.median(ttfts), statistics.fmean(ttfts), cached, overall


def report(turns: list[Turn], args: argparse.Namespace) -> None:
    print(f"\n{args.conversations} conversations x {args.turns} turns per phase, "
          f"{args.rounds} phases per policy, system prompt ~{args.system_words} words, "
          f"max_tokens {args.max_tokens}, 2 replicas, {args.threads} thread(s) each")
    print(f"{'policy':<12} {'TTFT p50':>9} {'TTFT mean':>10} {'cached (turns 2+)':>18} "
          f"{'cached (all)':>13} {'prompt tok':>11}")
    rows = {}
    for policy in ("round-robin", "affinity"):
        mine = [t for t in turns if t.policy == policy]
        rows[policy] = summary(mine)
        p50, mean, cached, overall = rows[policy]
        print(f"{policy:<12} {p50 * 1000:>7.0f}ms {mean * 1000:>8.0f}ms {cached:>17.1%} "
              f"{overall:>12.1%} {sum(t.prompt_tokens for t in mine):>11}")
    rr, aff = rows["round-robin"], rows["affinity"]
    print(f"ratio round-robin / affinity: TTFT p50 {rr[0] / aff[0]:.2f}x, "
          f"mean {rr[1] / aff[1]:.2f}x; uncached prompt share (turns 2+) "
          f"{(1 - rr[2]) / max(1e-9, 1 - aff[2]):.2f}x")
    for policy in ("round-robin", "affinity"):
        by_turn = [statistics.median(t.ttft_s for t in turns
                                     if t.policy == policy and t.turn == k) * 1000
                   for k in range(args.turns)]
        print(f"  {policy:<12} TTFT p50 by turn (ms): "
              + " ".join(f"{v:.0f}" for v in by_turn))


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="prefix-affinity-") as tmp:
        mesh = LocalMesh(Path(tmp), MeshOptions(workers=2, threads=args.threads))
        rr_proc = None
        try:
            mesh.start()
            rr_proc, rr_url = start_round_robin_gateway(mesh)
            urls = {"affinity": mesh.base_url, "round-robin": rr_url}
            fill_slots(rr_url)
            order = ["round-robin", "affinity"]
            turns: list[Turn] = []
            topics = iter(TOPICS * (1 + 2 * args.rounds * args.conversations // len(TOPICS)))
            for r in range(args.rounds):
                for policy in order if r % 2 == 0 else order[::-1]:
                    mine = [f"{next(topics)} (set {r})" for _ in range(args.conversations)]
                    print(f"round {r + 1}: {policy} ...", flush=True)
                    turns += phase(mesh, urls[policy], policy, mine, args)
            if args.verbose:
                for t in turns:
                    print(t)
            report(turns, args)
        finally:
            if rr_proc is not None:
                rr_proc.stop()
            mesh.stop()


def main() -> None:
    if "--round-robin-gateway" in sys.argv:
        argv = [a for a in sys.argv[1:] if a != "--round-robin-gateway"]
        sys.exit(serve_round_robin(argv))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=3)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--system-words", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--verbose", action="store_true", help="print every turn")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
