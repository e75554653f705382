"""Where a batched decode step of a split model goes, measured at the engine.

One head (this process: a BatchEngine with the first layers, the embeddings and the output)
and one ggml RPC stage server (a child process with the last layers) behind a proxy that
parses ggml's RPC requests. For batches of 1, 4 and 8 greedy sequences it prints, per
decode step: the step's wall time, the same step on the model served whole (same threads),
the time the head waited on the stage (from the last request byte to the first reply
byte, seen at the proxy: the stage's compute plus loopback), the RPC commands and bytes
the step sent, and the head's own share (step minus the wait).

    .venv/bin/python bench/split_profile.py [--head-threads 1] [--stage-threads 1]
        [--batches 1,4,8] [--tokens 24] [--stage-layers 9] [--deterministic on|off]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.split_procs import start_stage

# ggml-rpc's command numbers (protocol v3, ggml/src/ggml-rpc/ggml-rpc.cpp, enum rpc_cmd)
COMMANDS = ("ALLOC_BUFFER", "GET_ALIGNMENT", "GET_MAX_SIZE", "BUFFER_GET_BASE", "FREE_BUFFER",
            "BUFFER_CLEAR", "SET_TENSOR", "SET_TENSOR_HASH", "GET_TENSOR", "COPY_TENSOR",
            "GRAPH_COMPUTE", "GET_DEVICE_MEMORY", "INIT_TENSOR", "GET_ALLOC_SIZE", "HELLO",
            "DEVICE_COUNT", "GRAPH_RECOMPUTE", "MEMSET_TENSOR")
PROMPT = "Write a detailed essay about the history of the printing press."


@dataclass
class Tally:
    commands: collections.Counter[str] = field(default_factory=collections.Counter)
    to_server: int = 0
    to_client: int = 0
    writes: int = 0         # chunks the head wrote (each is one TCP read at the proxy)
    waited_s: float = 0.0   # from a request's last chunk to the reply's first


class RequestParser:
    """Splits the head's byte stream into RPC requests: cmd (1 byte), size (8), body."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[str]:
        self._buf += data
        found = []
        while len(self._buf) >= 9:
            size = int.from_bytes(self._buf[1:9], "little")
            if len(self._buf) < 9 + size:
                break
            cmd = self._buf[0]
            found.append(COMMANDS[cmd] if cmd < len(COMMANDS) else f"CMD{cmd}")
            del self._buf[:9 + size]
        return found


class ParsingProxy:
    """Loopback proxy to one RPC server that tallies requests, bytes and waits."""

    def __init__(self, target_port: int) -> None:
        self.tally = Tally()
        self._target = target_port
        self._parser = RequestParser()
        self._sent_at = 0.0
        self._waiting = False
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        ready.wait(10)

    def reset(self) -> Tally:
        tally, self.tally = self.tally, Tally()
        return tally

    async def _up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 20):
            t = self.tally
            t.to_server += len(data)
            t.writes += 1
            t.commands.update(self._parser.feed(data))
            self._sent_at, self._waiting = time.perf_counter(), True
            writer.write(data)
            await writer.drain()
        writer.close()

    async def _down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 20):
            if self._waiting:
                self.tally.waited_s += time.perf_counter() - self._sent_at
                self._waiting = False
            self.tally.to_client += len(data)
            writer.write(data)
            await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s_reader, s_writer = await asyncio.open_connection("127.0.0.1", self._target)
        await asyncio.gather(self._up(reader, s_writer), self._down(s_reader, writer),
                             return_exceptions=True)


def make_engine(model: str, threads: int, stage_layers: int, deterministic: bool) -> object:
    from meshllm.worker.engine.batch import BatchConfig, BatchEngine, LoadOptions

    load = (LoadOptions.split_head([stage_layers], repack=False) if stage_layers
            else LoadOptions(repack=False))
    return BatchEngine(BatchConfig(model_path=model, n_ctx=8 * 256, n_slots=8,
                                   n_threads=threads, prefix_reuse=False, load=load,
                                   deterministic=deterministic))


def decode_steps(engine: object, batch: int, tokens: int, proxy: ParsingProxy | None
                 ) -> list[tuple[float, Tally | None]]:
    """(seconds, tally) of each step in which every one of `batch` sequences decoded."""
    from meshllm.common.types import SamplingParams

    eng: object = engine
    tok = eng.tokenize(PROMPT)  # type: ignore[attr-defined]
    for i in range(batch):
        eng.submit(f"r{time.monotonic_ns()}-{i}", tok,  # type: ignore[attr-defined]
                   SamplingParams(max_tokens=tokens, temperature=0.0), lambda e: None)
    rows: list[tuple[float, Tally | None]] = []
    while True:
        before = eng.stats()  # type: ignore[attr-defined]
        if proxy is not None:
            proxy.reset()
        started = time.perf_counter()
        if not eng.step():  # type: ignore[attr-defined]
            return rows
        elapsed = time.perf_counter() - started
        after = eng.stats()  # type: ignore[attr-defined]
        if (after.prompt_tokens_processed == before.prompt_tokens_processed
                and after.generated_tokens - before.generated_tokens == batch):
            rows.append((elapsed, proxy.reset() if proxy is not None else None))


def summarize(batch: int, solo: list[tuple[float, Tally | None]],
              split: list[tuple[float, Tally | None]]) -> str:
    solo_ms = statistics.median(s for s, _ in solo) * 1000
    split_ms = statistics.median(s for s, _ in split) * 1000
    tallies = [t for _, t in split if t is not None]
    wait_ms = statistics.median(t.waited_s for t in tallies) * 1000
    cmds: collections.Counter[str] = collections.Counter()
    for t in tallies:
        cmds.update(t.commands)
    per_step = ", ".join(f"{k} {v / len(tallies):.1f}" for k, v in sorted(cmds.items()))
    up = statistics.median(t.to_server for t in tallies)
    down = statistics.median(t.to_client for t in tallies)
    writes = statistics.median(t.writes for t in tallies)
    return (f"  batch {batch}: step solo {solo_ms:6.1f} ms, split {split_ms:6.1f} ms "
            f"(x{split_ms / solo_ms:.2f}); waited on stage {wait_ms:5.1f} ms, head "
            f"{split_ms - wait_ms:5.1f} ms; per step: {up:.0f} B up in {writes:.0f} writes, "
            f"{down:.0f} B down; {per_step}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-threads", type=int, default=1)
    parser.add_argument("--stage-threads", type=int, default=1)
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--stage-layers", type=int, default=9)
    parser.add_argument("--deterministic", choices=("on", "off"), default="on")
    args = parser.parse_args()
    from meshllm.common.models import materialize
    from meshllm.native import rpc
    from meshllm.worker.engine.batch.numerics import numerics_for

    deterministic = args.deterministic == "on"
    numerics_for(deterministic).apply_to_process()  # the stage child inherits it
    model = str(materialize("gemma3-270m"))
    rpc.ensure_backends()
    solo = make_engine(model, args.head_threads, 0, deterministic)  # before RPC devices exist
    with tempfile.TemporaryDirectory() as tmp:
        stage, port = start_stage(Path(tmp), args.stage_threads, env=os.environ)
        try:
            proxy = ParsingProxy(port)
            rpc.add_rpc_servers([f"127.0.0.1:{proxy.port}"])
            split = make_engine(model, args.head_threads, args.stage_layers, deterministic)
            print(f"gemma3-270m, {18 - args.stage_layers} layers + output on the head "
                  f"({args.head_threads} threads), {args.stage_layers} on the stage "
                  f"({args.stage_threads} threads), deterministic {args.deterministic}; "
                  "medians over the decode steps", flush=True)
            for batch in (int(b) for b in args.batches.split(",")):
                decode_steps(solo, batch, 4, None)  # warm both
                decode_steps(split, batch, 4, proxy)
                a = decode_steps(solo, batch, args.tokens, None)
                b = decode_steps(split, batch, args.tokens, proxy)
                print(summarize(batch, a, b), flush=True)
        finally:
            stage.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
