"""A bounded load test: twice the mesh's slots of concurrent streams for a fixed time.

Starts a 2-worker mesh on loopback (real etcd, planner, workers, gateway; gemma3-270m),
then keeps `2 x slots` streamed completions in flight until the time is up, each with a
new prompt and 16-64 new tokens, and stops by itself. Reports what issue 18 asks:
answers by status (only 200 and 429 allowed), streams that hung (no end within
--request-timeout-s) or ended without a finish reason, p50/p95 time to first token, and
the resident memory of every process (services and their engine children) after a
warm-up and at the end, which should stay flat.

    .venv/bin/python bench/load_test.py [--duration-s 600] [--warmup-s 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.mesh import LocalMesh, MeshOptions

MODEL = "gemma3-270m"
SLOTS_PER_WORKER = 4  # the planner's default (MESHLLM_SLOTS)
WORKERS = 2
TOPICS = ["a lighthouse", "the printing press", "bees", "a mountain town", "glaciers",
          "the first computers", "a long train journey", "winter in a city"]


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    hung: int = 0
    unfinished: int = 0   # a 200 stream that ended without a finish reason
    broken: int = 0       # a data line that is not JSON (a chunk cut in two)
    ttft_s: list[float] = field(default_factory=list)
    tokens: int = 0


async def one_request(client: httpx.AsyncClient, url: str, n: int, timeout_s: float,
                      tally: Tally) -> None:
    body = {"model": MODEL, "prompt": f"Request {n}. A short story about "
            f"{random.choice(TOPICS)}:", "max_tokens": random.randint(16, 64), "stream": True}
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            await _stream(client, url, body, started, tally)
    except TimeoutError:
        tally.hung += 1


async def _stream(client: httpx.AsyncClient, url: str, body: dict[str, object],
                  started: float, tally: Tally) -> None:
    async with client.stream("POST", url, json=body) as response:
        tally.statuses[response.status_code] += 1
        if response.status_code != 200:
            await response.aread()
            return
        finished, first = False, True
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            try:
                choice = json.loads(line[6:]).get("choices", [{}])[0]
            except json.JSONDecodeError:
                tally.broken += 1
                continue
            if first:
                tally.ttft_s.append(time.perf_counter() - started)
                first = False
            tally.tokens += 1
            finished = finished or bool(choice.get("finish_reason"))
        if not finished:
            tally.unfinished += 1


async def drive(url: str, streams: int, duration_s: float, timeout_s: float) -> Tally:
    tally, deadline = Tally(), time.monotonic() + duration_s
    counter = iter(range(10**9))
    async with httpx.AsyncClient(timeout=None) as client:

        async def loop() -> None:
            while time.monotonic() < deadline:
                before = sum(tally.statuses.values())
                await one_request(client, url, next(counter), timeout_s, tally)
                if sum(tally.statuses.values()) == before or tally.statuses[429]:
                    await asyncio.sleep(0.05)  # refused or broken: do not spin

        await asyncio.gather(*(loop() for _ in range(streams)))
    return tally


def rss_mib(pid: int) -> float:
    """Resident memory of `pid` and all its descendants (a worker and its engine)."""
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            # Children are listed per thread: an engine may be started from any of them.
            children = [c for task in Path(f"/proc/{current}/task").iterdir()
                        for c in (task / "children").read_text().split()]
        except OSError:
            continue
        line = next((x for x in status.splitlines() if x.startswith("VmRSS:")), "VmRSS: 0 kB")
        total += int(line.split()[1]) / 1024
        todo.extend(int(c) for c in children)
    return total


def memory(mesh: LocalMesh) -> dict[str, float]:
    return {name: rss_mib(proc.pid) for name, proc in sorted(mesh.procs.items())}


def report(tally: Tally, start_rss: dict[str, float], end_rss: dict[str, float],
           duration_s: float, streams: int) -> bool:
    answered = sum(tally.statuses.values())
    print(f"\n{streams} concurrent streams for {duration_s:.0f} s: {answered} answers "
          f"({dict(sorted(tally.statuses.items()))}), {tally.tokens / duration_s:.1f} tok/s")
    ttft = sorted(tally.ttft_s)
    if ttft:
        p95 = ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))]
        print(f"time to first token: p50 {statistics.median(ttft) * 1000:.0f} ms, "
              f"p95 {p95 * 1000:.0f} ms")
    print(f"hung streams: {tally.hung}; streams ended without a finish: {tally.unfinished}; "
          f"chunks that were not JSON: {tally.broken}")
    print(f"\n{'process':<12} {'RSS after warm-up':>18} {'RSS at end':>11} {'end/start':>10}")
    for name in start_rss:
        start, end = start_rss[name], end_rss.get(name, 0.0)
        print(f"{name:<12} {start:>15.1f} MiB {end:>7.1f} MiB {end / max(start, 1e-9):>10.3f}")
    bad = set(tally.statuses) - {200, 429}
    ok = not bad and tally.hung == 0 and tally.unfinished == 0 and tally.broken == 0
    print("\nPASS: only 200 and 429, no stream hung" if ok else f"\nFAIL: statuses {bad}, "
          f"{tally.hung} hung, {tally.unfinished} unfinished")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration-s", type=float, default=600.0)
    p.add_argument("--warmup-s", type=float, default=30.0)
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    args = p.parse_args()
    streams = 2 * SLOTS_PER_WORKER * WORKERS
    with tempfile.TemporaryDirectory() as tmp:
        mesh = LocalMesh(Path(tmp), MeshOptions(workers=WORKERS, threads=1))
        try:
            mesh.start()
            url = mesh.base_url + "/v1/completions"
            print(f"warming up for {args.warmup_s:.0f} s with {streams} streams...")
            asyncio.run(drive(url, streams, args.warmup_s, args.request_timeout_s))
            start_rss = memory(mesh)
            print(f"running for {args.duration_s:.0f} s...")
            tally = asyncio.run(drive(url, streams, args.duration_s, args.request_timeout_s))
            end_rss = memory(mesh)
        finally:
            mesh.stop()
    return 0 if report(tally, start_rss, end_rss, args.duration_s, streams) else 1


if __name__ == "__main__":
    sys.exit(main())
