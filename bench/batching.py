"""Continuous batching: aggregate tok/s, completed requests and TTFT at 1, 4 and 8 streams.

Engines, all started in this run on the same model and threads, alternating in each round
(the median round per cell is shown):
  (gateway)     the whole mesh path with the mesh's defaults (see below)
  (a) engine    meshllm's BatchEngine, driven through a small asyncio harness, with its
      default config and the kernel switches a worker gives its engine process (so
      gateway / engine is the mesh path's cost, engine / llama-server the engine's)
  (b) lcp       llama-cpp-python's OpenAI server (`python -m llama_cpp.server`), default
  (b') lcp-noint  the same with `--interrupt_requests False` (queues instead of interrupting)
  (c) llama-server  llama.cpp's C++ server `--parallel 8`, built from the same vendored source
      by scripts/build_llama_server.sh (skipped with a message when the binary is absent)
Then speculative decoding, one stream, on a slower F16 copy of the model and a prompt that
repeats its context: no speculation vs n-gram lookup vs the Q4_K_M model as the draft.

    .venv/bin/python bench/batching.py [--threads 2] [--max-tokens 64] [--streams 1,4,8]
        [--rounds 3] [--only gateway,engine,lcp,lcp-noint,llama-server,spec]

`gateway` is the mesh as `mesh-llm up` starts it (its default slots and context); the
ratios at the largest stream count compare it and `engine` with each baseline. The `-ctx`
rows (not run by default) give each slot the mesh's default context, 4096 tokens, as
`gateway` has, instead of 512.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "common/src"), str(ROOT / "services/shard-worker/src")]
from meshllm.common.models import materialize  # noqa: E402
from meshllm.common.ports import PortPicker  # noqa: E402
from meshllm.common.types import SamplingParams  # noqa: E402
from meshllm.worker.engine.batch import BatchConfig, BatchEngine, Delta, Event, Failed, SpecMode  # noqa: E402
from meshllm.worker.engine.batch.backend import requantize  # noqa: E402
from meshllm.worker.engine.batch.numerics import TILED_MATMUL_ENV, numerics_for  # noqa: E402

LLAMA_SERVER = ROOT / "build/llama-server/bin/llama-server"
TOPICS = ["the ocean", "a mountain town", "the printing press", "bees", "a lighthouse keeper",
          "the first computers", "winter in a city", "a long train journey"]
REPEATING = ("Here is a list of fruits: apple, banana, cherry, date, elderberry, fig, grape, "
             "honeydew, kiwi, lemon, mango, nectarine, orange, papaya, quince, raspberry. "
             "Repeat the list exactly five times.\n") * 3 + "apple, banana, cherry,"
N_CTX = 4096  # cells in all: 512 per slot at 8 slots
# The mesh's default: a slot gets the model's whole --context-length (4096), so the
# `-ctx` rows give the engine and llama-server that per slot too (8 x 4096 cells).
N_CTX_MESH = 8 * 4096
ENGINES = ("gateway", "engine", "engine-ctx", "lcp", "lcp-noint", "llama-server",
           "llama-server-ctx")
# One request: (prompt, max_tokens) -> (ttft seconds or None, completion tokens, completed)
Issue = Callable[[str, int], Awaitable[tuple[float | None, int, bool]]]


@dataclass(frozen=True)
class Result:
    engine: str
    streams: int
    tok_s: float
    completed: int
    requests: int
    ttft_p50: float | None
    ttft_p95: float | None


def prompt_for(i: int) -> str:
    return f"Write a short story about {TOPICS[i % len(TOPICS)]}."


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def load(name: str, issue: Issue, streams: int, max_tokens: int) -> Result:
    """2 x streams requests, at most `streams` in flight."""
    gate, n = asyncio.Semaphore(streams), 2 * streams
    ttfts: list[float] = []
    tokens = completed = 0

    async def one(i: int) -> None:
        nonlocal tokens, completed
        async with gate:
            ttft, toks, ok = await issue(prompt_for(i), max_tokens)
        tokens += toks
        completed += ok
        if ttft is not None and ok:
            ttfts.append(ttft)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - started
    return Result(name, streams, tokens / wall, completed, n, pct(ttfts, 0.5), pct(ttfts, 0.95))


class Mailbox:
    """Carries engine events into the event loop with at most one wake-up per batch of
    events: a wake-up per token would make the loop compete for the cores with llama.cpp's
    spinning threads at every step."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop, self._lock = loop, threading.Lock()
        self._items: list[Event] = []
        self._ready = asyncio.Event()

    def put(self, ev: Event) -> None:  # engine thread
        with self._lock:
            self._items.append(ev)
            wake = len(self._items) == 1
        if wake:
            self._loop.call_soon_threadsafe(self._ready.set)

    async def take(self) -> list[Event]:
        await self._ready.wait()
        with self._lock:
            items, self._items = self._items, []
            self._ready.clear()
        return items


def engine_issuer(engine: BatchEngine) -> Issue:
    """The harness the gateway path will replace (events hop into the event loop)."""
    counter = iter(range(1 << 62))

    async def issue(prompt: str, max_tokens: int) -> tuple[float | None, int, bool]:
        box = Mailbox(asyncio.get_running_loop())
        rid, started = f"b{next(counter)}", time.perf_counter()
        engine.submit(rid, engine.tokenize(prompt),
                      SamplingParams(max_tokens=max_tokens, temperature=0.0), box.put)
        ttft, tokens = None, 0
        while True:
            for ev in await box.take():
                if not isinstance(ev, Delta):
                    return ttft, tokens, not isinstance(ev, Failed)
                if ttft is None and ev.tokens:
                    ttft = time.perf_counter() - started
                tokens += ev.tokens
    return issue


def http_issuer(base: str, timeout: float) -> Issue:
    async def issue(prompt: str, max_tokens: int) -> tuple[float | None, int, bool]:
        body = {"model": "gemma3-270m", "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0.0, "stream": True}
        started, ttft, tokens = time.perf_counter(), None, 0
        try:
            async with httpx.AsyncClient(timeout=timeout) as client, client.stream(
                    "POST", f"{base}/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    return None, 0, False
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    text = json.loads(line[6:])["choices"][0].get("text", "")
                    if text:  # one streamed chunk per token on both servers
                        ttft = ttft if ttft is not None else time.perf_counter() - started
                        tokens += 1
                    if json.loads(line[6:])["choices"][0].get("finish_reason"):
                        return ttft, tokens, True
        except (httpx.HTTPError, json.JSONDecodeError, KeyError, IndexError):
            return ttft, tokens, False
        return ttft, tokens, False  # the stream ended without a finish: interrupted
    return issue


def engine_numerics_env() -> None:
    """This process computes the `engine` row as a worker's engine process would with the
    default BatchConfig (ggml reads the kernel switch once, at the first matmul): set it
    before any engine starts. The baselines' own processes start without it (baseline_env)."""
    os.environ.update(numerics_for(BatchConfig(model_path="").deterministic).process_env())


def baseline_env() -> dict[str, str]:
    """The environment llama.cpp's own servers run in: their defaults, whatever this
    process set for the `engine` row."""
    return {k: v for k, v in os.environ.items() if k != TILED_MATMUL_ENV}


def start_server(cmd: list[str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=baseline_env())
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {' '.join(cmd)}")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not come up: {' '.join(cmd)}")


def server_cmds(model: str, threads: int) -> dict[str, Callable[[int], list[str]]]:
    def lcp(port: int) -> list[str]:
        return [sys.executable, "-m", "llama_cpp.server", "--model", model, "--n_ctx",
                str(N_CTX), "--n_threads", str(threads), "--n_threads_batch", str(threads),
                "--host", "127.0.0.1", "--port", str(port)]

    def cpp(port: int, n_ctx: int = N_CTX) -> list[str]:
        return [str(LLAMA_SERVER), "-m", model, "-c", str(n_ctx), "-t", str(threads), "-tb",
                str(threads), "--parallel", "8", "--host", "127.0.0.1", "--port", str(port)]

    cmds = {"lcp": lcp, "lcp-noint": lambda port: [*lcp(port), "--interrupt_requests", "False"]}
    if LLAMA_SERVER.is_file():
        cmds["llama-server"] = cpp
        cmds["llama-server-ctx"] = lambda port: cpp(port, N_CTX_MESH)
    return cmds


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(30)


def start_all(model: str, threads: int, only: set[str],
              stack: contextlib.ExitStack) -> dict[str, Issue]:
    """Every engine up at once, so that rounds can alternate between them."""
    issuers: dict[str, Issue] = {}
    if "gateway" in only:
        issuers["gateway"] = start_mesh(threads, stack)
    for name, n_ctx in (("engine", N_CTX), ("engine-ctx", N_CTX_MESH)):
        if name in only:
            engine = BatchEngine(BatchConfig(model_path=model, n_ctx=n_ctx, n_slots=8,
                                             n_threads=threads))
            engine.start()
            stack.callback(engine.stop)
            issuers[name] = engine_issuer(engine)
    for name, cmd_for in server_cmds(model, threads).items():
        if name in only:
            port = PortPicker().pick()
            stack.callback(stop_server, start_server(cmd_for(port), port))
            issuers[name] = http_issuer(f"http://127.0.0.1:{port}", timeout=120)
    return issuers


def start_mesh(threads: int, stack: contextlib.ExitStack) -> Issue:
    """The whole path a user takes: gateway -> gRPC -> worker -> engine process, with the
    planner's defaults (no --slots, no --context-length: what `mesh-llm up` gives), so the
    row measures the defaults and not a tuned mesh. Only the threads match the others."""
    sys.path.insert(0, str(ROOT))
    from tests.support.mesh import LocalMesh, MeshOptions

    root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    mesh = LocalMesh(root, MeshOptions(workers=1, threads=threads, worker_memory="4GiB"))
    mesh.start()
    stack.callback(mesh.stop)
    status = mesh.status()
    slots = [m.get("slots") for n in status.get("nodes", []) for m in n["models"].values()]
    contexts = [m.get("context_length") for m in status.get("models", [])]
    print(f"gateway: the mesh's defaults: slots {slots}, context {contexts} per slot",
          flush=True)
    return http_issuer(mesh.base_url, timeout=120)


Rounds = dict[tuple[str, int], list[Result]]  # (engine, streams) -> one result per round


def measure(issuers: dict[str, Issue], streams: list[int], rounds: int,
            max_tokens: int) -> Rounds:
    """Alternates engines within each round (the machine is shared: noise hits all alike);
    every round's result per cell."""
    for name, issue in issuers.items():
        asyncio.run(load(name, issue, 1, 8))  # warm-up
    raw: Rounds = {}
    for round_no in range(rounds):
        for s in streams:
            for name, issue in issuers.items():
                r = asyncio.run(load(name, issue, s, max_tokens))
                print(f"  round {round_no}: {name:<13}{s} streams {r.tok_s:7.1f} tok/s "
                      f"{r.completed}/{r.requests} done", flush=True)
                raw.setdefault((name, s), []).append(r)
    return raw


def medians(raw: Rounds) -> list[Result]:
    """Each cell's median round by tok/s."""
    return [sorted(rs, key=lambda r: r.tok_s)[len(rs) // 2] for rs in raw.values()]


def spec_run(cfg: BatchConfig, max_tokens: int) -> tuple[float, float, float]:
    """One stream on the repeating prompt: (tok/s, acceptance, tokens per step)."""
    engine = BatchEngine(cfg)
    issue = engine_issuer(engine)
    thread = threading.Thread(target=engine.run_forever, daemon=True)
    thread.start()
    try:
        async def once() -> tuple[float | None, int, bool]:
            return await issue(REPEATING, max_tokens)

        started = time.perf_counter()
        _, tokens, _ = asyncio.run(once())
        wall = time.perf_counter() - started
        s = engine.stats()
        return tokens / wall, s.acceptance_rate, s.tokens_per_step
    finally:
        engine.stop()


def fmt(x: float | None, unit: float = 1000.0) -> str:
    return "-" if x is None else f"{x * unit:.0f}"


def print_table(results: list[Result]) -> None:
    print(f"\n{'engine':<14}{'streams':>8}{'tok/s':>8}{'done':>8}{'ttft p50 ms':>13}"
          f"{'ttft p95 ms':>13}")
    for r in results:
        print(f"{r.engine:<14}{r.streams:>8}{r.tok_s:>8.1f}{f'{r.completed}/{r.requests}':>8}"
              f"{fmt(r.ttft_p50):>13}{fmt(r.ttft_p95):>13}")


def ratios(raw: Rounds, streams: int) -> None:
    """Ours over each baseline at `streams`: the median of the per-round ratios (both ran
    in the same round, so slow drifts of the machine's load cancel) and the ratio of the
    medians."""
    for ours in ("gateway", "engine", "engine-ctx"):
        for base in ("lcp", "lcp-noint", "llama-server", "llama-server-ctx"):
            mine, theirs = raw.get((ours, streams)), raw.get((base, streams))
            if not mine or not theirs:
                continue
            # A round where either lost requests (a shared machine starved a lease) says
            # nothing about speed: left out.
            per_round = sorted(a.tok_s / b.tok_s for a, b in zip(mine, theirs, strict=True)
                               if b.tok_s > 0 and a.completed == a.requests
                               and b.completed == b.requests)
            if not per_round:
                continue
            of_medians = medians({(ours, streams): mine})[0].tok_s / \
                max(medians({(base, streams): theirs})[0].tok_s, 1e-9)
            print(f"{ours} / {base} at {streams} streams: {per_round[len(per_round) // 2]:.2f} "
                  f"(median of {len(per_round)} rounds: "
                  f"{', '.join(f'{x:.2f}' for x in per_round)}; of the medians "
                  f"{of_medians:.2f})")


def speculative(model: str, threads: int, max_tokens: int) -> None:
    target = str(requantize(model, Path(model).with_name("gemma-3-270m-f16.gguf"), "F16",
                            threads))
    base = BatchConfig(model_path=target, n_ctx=2048, n_slots=1, n_threads=threads, n_batch=512)
    print(f"\nspeculative, 1 stream, target F16 ({max_tokens} tokens, repeating prompt)")
    plain = spec_run(base, max_tokens)
    print(f"{'mode':<10}{'tok/s':>8}{'speedup':>9}{'accept':>8}{'tok/step':>10}")
    for label, mode, k in (("none", SpecMode.NONE, 4), ("ngram k4", SpecMode.NGRAM, 4),
                           ("ngram k8", SpecMode.NGRAM, 8), ("draft k2", SpecMode.DRAFT, 2),
                           ("draft k4", SpecMode.DRAFT, 4)):
        cfg = BatchConfig(**{**base.__dict__, "spec_mode": mode, "draft_model_path": model,
                             "draft_max": k})
        tok_s, acc, per = plain if mode is SpecMode.NONE else spec_run(cfg, max_tokens)
        print(f"{label:<10}{tok_s:>8.1f}{tok_s / plain[0]:>9.2f}{acc:>8.2f}{per:>10.2f}")

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--streams", default="1,4,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="gateway,engine,lcp,lcp-noint,llama-server,spec",
                    help=f"any of {','.join(ENGINES)},spec")
    args = ap.parse_args()
    model, streams = str(materialize("gemma3-270m")), [int(s) for s in args.streams.split(",")]
    only = set(args.only.split(","))
    engine_numerics_env()
    with contextlib.ExitStack() as stack:
        raw = measure(start_all(model, args.threads, only, stack), streams, args.rounds,
                      args.max_tokens)
    results = medians(raw)
    if "llama-server" in only and not LLAMA_SERVER.is_file():
        print(f"(c) skipped: {LLAMA_SERVER} is absent; build it with "
              "scripts/build_llama_server.sh")
    print(f"\n{args.max_tokens} tokens per request, 2 x streams requests per cell, greedy, "
          f"{args.threads} threads; median of {args.rounds} alternating rounds")
    print_table(sorted(results, key=lambda r: (ENGINES.index(r.engine), r.streams)))
    ratios(raw, max(streams))
    if "spec" in only:
        speculative(model, args.threads, 128)


if __name__ == "__main__":
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    main()
