"""Blackboard gossip: how long a post takes to reach every node, and how many posts per
second one node accepts.

Starts a real etcd and N real blackboard nodes on loopback, subscribes to every node, then
posts from each node in turn and times until the post has arrived at all of them (the
slowest node decides). Reports p50/p95 for 3 and 10 nodes and their ratio; then drives
one node of the 3-node mesh with concurrent clients and reports accepted posts/second.

    .venv/bin/python bench/blackboard_gossip.py [--sizes 3,10] [--posts 100]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from meshllm.common.blackboard.client import BlackboardClient
from meshllm.common.blackboard.types import Draft, PostId

from tests.support.blackboard import BlackboardNode, eventually, start_nodes
from tests.support.procs import start_etcd

NODE_ARGS = ("--posts-per-author-per-minute", "1000000", "--log-level", "WARNING")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Arrivals:
    """When each post arrived at each node, from one subscription per node."""

    def __init__(self, n_nodes: int) -> None:
        self.n_nodes = n_nodes
        self.seen: dict[PostId, list[float]] = {}
        self.done: dict[PostId, asyncio.Event] = {}

    def expect(self, post_id: PostId) -> asyncio.Event:
        return self.done.setdefault(post_id, asyncio.Event())

    async def listen(self, client: BlackboardClient) -> None:
        async for post in client.subscribe():
            times = self.seen.setdefault(post.post_id, [])
            times.append(time.perf_counter())
            if len(times) == self.n_nodes:
                self.expect(post.post_id).set()


async def spread_latencies(nodes: list[BlackboardNode], n_posts: int, gap_s: float
                           ) -> list[float]:
    clients = [n.client() for n in nodes]
    arrivals = Arrivals(len(nodes))
    listeners = [asyncio.create_task(arrivals.listen(c)) for c in clients]
    try:
        async def all_subscribed() -> bool:  # subscriptions give no signal they are live
            probe = await clients[0].post(Draft("probe", "warm-up"))
            await asyncio.sleep(0.2)
            return len(arrivals.seen.get(probe.post.post_id, [])) == len(nodes)
        await eventually(all_subscribed, 30, "every subscription to be live", poll_s=0.1)
        latencies = []
        for i in range(n_posts):
            started = time.perf_counter()
            accepted = await clients[i % len(clients)].post(Draft(f"bench-{i % 7}", f"p {i}"))
            await asyncio.wait_for(arrivals.expect(accepted.post.post_id).wait(), 30)
            latencies.append(max(arrivals.seen[accepted.post.post_id]) - started)
            await asyncio.sleep(gap_s)
        return latencies
    finally:
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        for client in clients:
            await client.close()


async def accepted_per_second(node: BlackboardNode, seconds: float, concurrency: int
                              ) -> float:
    deadline = time.perf_counter() + seconds
    counts = [0] * concurrency

    async def worker(k: int) -> None:
        async with node.client() as client:
            while time.perf_counter() < deadline:
                await client.post(Draft(f"load-{k}", f"load post {counts[k]} from {k}"))
                counts[k] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return sum(counts) / (time.perf_counter() - started)


async def run_mesh(size: int, args: argparse.Namespace, root: Path, etcd: str
                   ) -> tuple[list[float], float | None]:
    nodes = [BlackboardNode(f"n{size}-{i}", etcd, root, *NODE_ARGS) for i in range(size)]
    try:
        await start_nodes(nodes)
        await asyncio.sleep(1.0)  # let every node see every peer in etcd
        latencies = await spread_latencies(nodes, args.posts, args.gap_ms / 1000)
        rate = None
        if size == min(args.sizes):
            rate = await accepted_per_second(nodes[0], args.load_s, args.concurrency)
        return latencies, rate
    finally:
        for node in nodes:
            node.stop()


def report(size: int, latencies: list[float]) -> float:
    p50, p95 = percentile(latencies, 0.5) * 1000, percentile(latencies, 0.95) * 1000
    print(f"{size:>3} nodes: post reaches all nodes  p50 {p50:7.2f} ms  p95 {p95:7.2f} ms  "
          f"max {max(latencies) * 1000:7.2f} ms  mean {statistics.mean(latencies) * 1000:7.2f}"
          f" ms  ({len(latencies)} posts)")
    return p50


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bb-bench-") as tmp:
        root = Path(tmp)
        etcd_proc, etcd = start_etcd(root / "etcd", root)
        try:
            p50s = {}
            for size in args.sizes:
                latencies, rate = await run_mesh(size, args, root, etcd)
                p50s[size] = report(size, latencies)
                if rate is not None:
                    print(f"    one node of {size} accepts {rate:7.0f} posts/s "
                          f"({args.concurrency} concurrent clients, {args.load_s:.0f} s, "
                          f"each post also pushed to {size - 1} peers)")
            if len(p50s) == 2:
                small, large = sorted(p50s)
                print(f"p50 ratio {large} nodes / {small} nodes: {p50s[large] / p50s[small]:.2f}")
        finally:
            etcd_proc.stop()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="3,10",
                   type=lambda s: sorted(int(x) for x in s.split(",")))
    p.add_argument("--posts", type=int, default=100)
    p.add_argument("--gap-ms", type=float, default=20.0, help="pause between posts")
    p.add_argument("--load-s", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=16)
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
