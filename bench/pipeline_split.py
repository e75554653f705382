"""Pipeline splits against the same model served solo, in the same run.

Part 1, through the whole mesh (gateway -> head worker -> stages): decode tok/s and time to
first token for gemma3-270m solo, split over 2 and 3 workers, with ggml RPC tunnelled
through gRPC and direct, with mesh-llm's ggml-rpc build (native/) and, for comparison,
llama-cpp-python's stock one. Target: 2 stages through the tunnel >= 0.9 of solo.

Part 2, at the engine (a head process with RPC servers behind a counting, delaying proxy):
bytes sent per generated token, round trips per token per stage measured with 10 and 20 ms
added per hop (target: 1), and bytes sent when the split model is loaded again with the
stage's tensor cache warm (target: under 5% of the remote layers' size).

Part 3: the same warm reload on a synthetic model whose tensors exceed the 10 MB above which
ggml's RPC client sends hashes instead of bytes (gemma3-270m's are all smaller).

    .venv/bin/python bench/pipeline_split.py [--rounds 7] [--max-tokens 96] [--part 1|2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.proxy import DelayProxy
from tests.support.mesh import LocalMesh, MeshOptions
from tests.support.procs import free_port, port_open, wait_until

PROMPT = "Write a detailed essay about the history of the printing press."
STOCK = ("--rpc-library", "stock")  # llama-cpp-python's own ggml-rpc, for comparison
DIRECT = ("--rpc-transport", "direct")
TOPOLOGIES = {  # name: (worker budgets, workers expected in the replica, worker flags)
    "solo": (("2GiB",), 1, ()),
    "2 stages, tunnel": (("300MiB", "300MiB"), 2, ()),
    "3 stages, tunnel": (("300MiB", "120MiB", "120MiB"), 3, ()),
    "2 stages, direct": (("300MiB", "300MiB"), 2, DIRECT),
    "3 stages, direct": (("300MiB", "120MiB", "120MiB"), 3, DIRECT),
    "2 stages, tunnel, stock ggml-rpc": (("300MiB", "300MiB"), 2, STOCK),
    "2 stages, direct, stock ggml-rpc": (("300MiB", "300MiB"), 2, (*DIRECT, *STOCK)),
}


def stream_once(client: openai.OpenAI, max_tokens: int) -> tuple[float, float]:
    started = time.perf_counter()
    stream = client.completions.create(model="gemma3-270m", prompt=PROMPT,
                                       max_tokens=max_tokens, temperature=0, stream=True)
    stamps = [time.perf_counter() for c in stream if c.choices and c.choices[0].text]
    return stamps[0] - started, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def start_mesh(tmp: Path, name: str) -> tuple[LocalMesh, openai.OpenAI]:
    budgets, stages, flags = TOPOLOGIES[name]
    mesh = LocalMesh(tmp, MeshOptions(
        workers=len(budgets), worker_memories=budgets, expect_replicas=1,
        # The split's own cost, without the n-gram drafting a split head gets by default
        # (`auto`): speculation across a split is bench/split_latency.py's.
        worker_args=flags, planner_args=("--slots", "1", "--speculative", "none")))
    mesh.start()
    replica = mesh.status()["models"][0]["replicas"][0]
    assert len(replica["stages"]) == stages, replica
    client = openai.OpenAI(base_url=mesh.base_url + "/v1", api_key="x")
    stream_once(client, 8)
    return mesh, client


def paired_runs(solo: openai.OpenAI, other: openai.OpenAI, rounds: int, max_tokens: int
                ) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Alternating runs on the solo mesh and another one (the machine's noise drifts)."""
    return [(stream_once(solo, max_tokens), stream_once(other, max_tokens))
            for _ in range(rounds)]


def part_one(rounds: int, max_tokens: int) -> None:
    print(f"Part 1: through the mesh, gemma3-270m, 1 thread per worker, {max_tokens} tokens;"
          f" each split alternates {rounds} runs with the solo mesh, medians")
    with tempfile.TemporaryDirectory() as root:
        solo_mesh, solo = start_mesh(Path(root) / "solo", "solo")
        try:
            ratios = {}
            for name in [n for n in TOPOLOGIES if n != "solo"]:
                mesh, client = start_mesh(Path(root) / name.replace(" ", "_"), name)
                try:
                    runs = paired_runs(solo, client, rounds, max_tokens)
                finally:
                    mesh.stop()
                s_ttft, s_speed = (statistics.median(r[0][i] for r in runs) for i in (0, 1))
                ttft, speed = (statistics.median(r[1][i] for r in runs) for i in (0, 1))
                ratios[name] = speed / s_speed
                print(f"  {name:<32} decode {speed:6.1f} tok/s vs solo {s_speed:6.1f}  ratio "
                      f"{speed / s_speed:5.3f}   first token {ttft * 1000:5.1f} ms "
                      f"({(ttft - s_ttft) * 1000:+5.1f} ms)", flush=True)
        finally:
            solo_mesh.stop()
    print(f"RESULT 2-stage tunnel decode ratio: {ratios['2 stages, tunnel']:.3f}   target >= 0.9")


class Head:
    """bench/split_driver.py in a child process."""

    def __init__(self, endpoints: list[str], layers: list[int], model: str = "",
                 library: str = "meshllm") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "split_driver.py"),
             ",".join(endpoints), ",".join(map(str, layers)), *([model] if model else []),
             "--library", library],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "loaded", line

    def generate(self, n: int) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_rpc_servers(count: int, cache_root: Path, library: str = "meshllm"
                      ) -> list[tuple[subprocess.Popen[bytes], int]]:
    servers = []
    for i in range(count):
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshllm.worker.rpc_server", "--endpoint",
             f"127.0.0.1:{port}", "--cache-dir", str(cache_root / f"stage{i}"),
             "--library", library],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda p=port: port_open(p), 30, "RPC server")  # type: ignore[misc]
        servers.append((proc, port))
    return servers


def decode_cost(head: Head, proxies: list[DelayProxy], n: int) -> tuple[float, int]:
    """(seconds per token, bytes per token) over the decode phase of an n-token run."""
    for p in proxies:
        p.reset()
    one = head.generate(1)
    bytes_one = sum(p.counters.to_server + p.counters.to_client for p in proxies)
    for p in proxies:
        p.reset()
    run = head.generate(n)
    bytes_n = sum(p.counters.to_server + p.counters.to_client for p in proxies)
    del one
    return run["s_per_token"], (bytes_n - bytes_one) // (n - 1)


def delayed_costs(head: Head, proxies: list[DelayProxy], stages: int, base_s: float,
                  max_tokens: int) -> list[tuple[int, float, float]]:
    """(delay ms, seconds per token, round trips per token per stage) at +10 and +20 ms."""
    rows = []
    for delay_ms in (10, 20):
        for p in proxies:
            p.delay_s = delay_ms / 1000
        delayed_s, _ = decode_cost(head, proxies, max(8, max_tokens // 8))
        round_trips = (delayed_s - base_s) / (2 * delay_ms / 1000) / stages
        rows.append((delay_ms, delayed_s, round_trips))
        for p in proxies:
            p.delay_s = 0.0
    return rows


def part_two(max_tokens: int) -> None:
    from meshllm.common.models import describe

    spec = describe("gemma3-270m", 2048)
    print("Part 2: one head process and RPC stage servers behind a counting, delaying proxy")
    for stages, layers in ((1, [9]), (2, [6, 6])):
        with tempfile.TemporaryDirectory() as tmp:
            servers = start_rpc_servers(stages, Path(tmp))
            proxies = [DelayProxy(("127.0.0.1", port)) for _, port in servers]
            endpoints = [f"127.0.0.1:{p.port}" for p in proxies]
            try:
                head = Head(endpoints, layers)
                cold = sum(p.counters.to_server for p in proxies)
                base_s, per_token = decode_cost(head, proxies, max_tokens)
                rows = delayed_costs(head, proxies, stages, base_s, max_tokens)
                head.close()
                for p in proxies:
                    p.reset()
                Head(endpoints, layers).close()  # load again: the stages' caches are warm
                warm = sum(p.counters.to_server for p in proxies)
            finally:
                for proc, _ in servers:
                    proc.kill()
        remote = spec.layer_weight_bytes(18 - sum(layers), 18)
        print(f"  {stages} stage(s), {sum(layers)} remote layers "
              f"({remote / 1e6:.1f} MB of weights)")
        print(f"    bytes per generated token: {per_token}")
        for delay_ms, delayed_s, round_trips in rows:
            print(f"    +{delay_ms} ms per hop each way: {1 / delayed_s:5.1f} tok/s "
                  f"(vs {1 / base_s:5.1f}) -> {round_trips:.2f} round trips per token per stage"
                  f"   target 1")
        print(f"    load bytes cold {cold / 1e6:.1f} MB, warm-cache reload {warm / 1e6:.1f} MB "
              f"= {100 * warm / remote:.1f}% of the remote layers   target < 5%")


def part_three() -> None:
    """Warm-cache reload on a model whose layer tensors exceed ggml's 10 MB hash threshold."""
    from meshllm.common.models import describe

    from bench.synthetic_model import make_llama

    cache = Path.home() / ".cache" / "mesh-llm" / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    model = make_llama(cache / "synthetic-llama-3x2560.gguf", 3, 2560, 6912)
    remote = describe(str(model), 512).layer_weight_bytes(1, 3)
    with tempfile.TemporaryDirectory() as tmp:
        servers = start_rpc_servers(1, Path(tmp))
        proxy = DelayProxy(("127.0.0.1", servers[0][1]))
        endpoint = [f"127.0.0.1:{proxy.port}"]
        try:
            Head(endpoint, [2], str(model)).close()
            cold = proxy.counters.to_server
            proxy.reset()
            head = Head(endpoint, [2], str(model))
            warm = proxy.counters.to_server
            head.generate(4)  # the reloaded split still computes
            split_s = head.generate(16)["s_per_token"]
            head.close()
        finally:
            servers[0][0].kill()
        whole = Head([], [], str(model))  # the same model in one process, same threads
        whole_s = whole.generate(16)["s_per_token"]
        whole.close()
    print("Part 3: synthetic llama (3 layers, 13-35 MB F16 matrices), 2 layers on 1 stage "
          f"({remote / 1e6:.0f} MB)")
    print(f"    load bytes cold {cold / 1e6:.1f} MB, warm-cache reload {warm / 1e6:.2f} MB "
          f"= {100 * warm / remote:.2f}% of the remote layers   target < 5%")
    print(f"    decode split {split_s * 1000:.1f} ms/token vs whole {whole_s * 1000:.1f} ms/token"
          f" = {whole_s / split_s:.3f} of whole (engine level, loopback, 1 thread each)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--part", choices=("1", "2", "3", "all"), default="all")
    args = parser.parse_args()
    if args.part in ("1", "all"):
        part_one(args.rounds, args.max_tokens)
    if args.part in ("2", "all"):
        part_two(args.max_tokens)
    if args.part in ("3", "all"):
        part_three()
    return 0


if __name__ == "__main__":
    sys.exit(main())
