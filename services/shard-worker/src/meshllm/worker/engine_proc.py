"""The engine process: one llama.cpp model serving many requests at once (continuous
batching), driven over stdin/stdout with JSON lines.

It runs apart from the service so that a native crash or abort (llama.cpp aborts on a
lost RPC peer, for one) kills only this process; the service reports it and restarts it.

Commands in:  {"op": "load", "path", "n_ctx", "n_threads", "slots", "max_queue", ...}
              {"op": "generate", "id", "text" | "chat", "sampling"}
              {"op": "cancel", "id"}
Events out:   {"ev": "progress", "fraction"} ... then {"ev": "loaded"} | {"ev": "load_failed"}
              {"ev": "delta", "id", "text", "tokens"}
              {"ev": "finished", "id", "finish_reason", "prompt_tokens", "cached_tokens",
               "completion_tokens", "started_ns", "first_token_ns"}
              {"ev": "error", "id", "kind", "message"}
              {"ev": "stats", "running", "queued", "drafted", "accepted", "steps", ...}
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import IO, Any

from meshllm.common.errors import MeshError
from meshllm.common.types import ChatMessage, SamplingParams
from meshllm.worker.batch import BatchConfig, BatchEngine
from meshllm.worker.batch.config import SpecMode
from meshllm.worker.batch.events import Delta, Event, Finished
from meshllm.worker.load_params import (
    HEAD_TENSORS,
    offload_params,
    progress_reporter,
    weight_repacking,
)

STATS_PERIOD_S = 1.0


class Channel:
    """Writes events as JSON lines on a private copy of stdout.

    llama.cpp may print to fd 1; the protocol gets its own descriptor and fd 1 is pointed
    at stderr so that nothing stray lands in the event stream.
    """

    def __init__(self) -> None:
        self._out: IO[str] = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        self._lock = threading.Lock()

    def send(self, **event: Any) -> None:
        line = json.dumps(event, ensure_ascii=False)
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()


def sampling_from(d: dict[str, Any]) -> SamplingParams:
    return SamplingParams(
        max_tokens=int(d.get("max_tokens", 0)), temperature=float(d.get("temperature", 1.0)),
        top_p=float(d.get("top_p", 1.0)), seed=d.get("seed"), stop=tuple(d.get("stop", ())),
        top_k=int(d.get("top_k", 0)), presence_penalty=float(d.get("presence_penalty", 0.0)),
        frequency_penalty=float(d.get("frequency_penalty", 0.0)),
        repeat_penalty=float(d.get("repeat_penalty", 1.0)),
    )


def batch_config(cmd: dict[str, Any]) -> BatchConfig:
    slots = int(cmd.get("slots", 1))
    speculative = str(cmd.get("speculative", "none"))
    mode, _, draft = speculative.partition(":")
    return BatchConfig(
        model_path=cmd["path"], n_ctx=int(cmd["n_ctx"]) * slots, n_slots=slots,
        n_threads=int(cmd["n_threads"]), max_queue=int(cmd.get("max_queue", 16)),
        spec_mode=SpecMode(mode), draft_model_path=draft or None,
    )


def load(cmd: dict[str, Any], out: Channel | None = None) -> BatchEngine:
    from meshllm.native import rpc  # imported here: only the engine process needs llama.cpp

    rpc.ensure_backends()
    offload = None
    if cmd.get("rpc_endpoints"):
        # Registered RPC devices come first in llama.cpp's device list and take the last
        # layers in order; the embeddings, output and first layers stay here: the head.
        library = rpc.RpcLibrary(cmd.get("rpc_library", rpc.RpcLibrary.MESHLLM.value))
        rpc.add_rpc_servers(list(cmd["rpc_endpoints"]), library)
        offload = offload_params([int(x) for x in cmd["tensor_split"]])
    progress = None
    if out is not None:
        progress = progress_reporter(lambda f: out.send(ev="progress", fraction=f))
    keep = HEAD_TENSORS if offload else ""
    with weight_repacking(bool(cmd.get("weight_repack", False)), keep, progress, offload):
        return BatchEngine(batch_config(cmd))


class Session:
    """Turns commands into engine submissions and engine events into JSON lines."""

    def __init__(self, engine: BatchEngine, out: Channel) -> None:
        self._engine = engine
        self._out = out
        self._times: dict[str, list[int]] = {}  # request id -> [started_ns, first_token_ns]
        self._lock = threading.Lock()

    def generate(self, cmd: dict[str, Any]) -> None:
        rid = cmd["id"]
        chat = None
        if cmd.get("chat") is not None:
            chat = tuple(ChatMessage(m["role"], m["content"]) for m in cmd["chat"])
        with self._lock:
            self._times[rid] = [time.time_ns(), 0]
        try:
            tokens, stops = self._engine.prompt_tokens(cmd.get("text"), chat)
            self._engine.submit(rid, tokens, sampling_from(cmd.get("sampling", {})),
                                self.on_event, stops=stops)
        except MeshError as exc:  # too long, invalid, queue full: the service maps the kind
            with self._lock:
                self._times.pop(rid, None)
            self._out.send(ev="error", id=rid, kind=type(exc).__name__, message=str(exc))

    def on_event(self, event: Event) -> None:
        rid = event.request_id
        if isinstance(event, Delta):
            with self._lock:
                times = self._times.get(rid)
                if times is not None and not times[1]:
                    times[1] = time.time_ns()
            self._out.send(ev="delta", id=rid, text=event.text, tokens=event.tokens)
            return
        with self._lock:
            started, first = self._times.pop(rid, [0, 0])
        if isinstance(event, Finished):
            self._out.send(ev="finished", id=rid, finish_reason=event.reason,
                           prompt_tokens=event.prompt_tokens,
                           cached_tokens=event.cached_prompt_tokens,
                           completion_tokens=event.completion_tokens,
                           started_ns=started, first_token_ns=first)
        else:
            self._out.send(ev="error", id=rid, kind=event.kind, message=event.message)

    def report_stats(self) -> None:
        last: dict[str, Any] = {}
        while True:
            s = self._engine.stats()
            now = {"running": s.running, "queued": s.queued, "steps": s.steps,
                   "drafted": s.drafted_tokens, "accepted": s.accepted_tokens,
                   "tokens_per_step": round(s.tokens_per_step, 3),
                   "cached_prompt_tokens": s.prompt_tokens_cached}
            if now != last:
                self._out.send(ev="stats", **now)
                last = now
            time.sleep(STATS_PERIOD_S)


def main() -> int:
    out = Channel()
    first = json.loads(sys.stdin.readline() or "{}")
    try:
        engine = load(first, out)
    except Exception as exc:  # any load failure is reported to the service, which decides
        out.send(ev="load_failed", error=f"{type(exc).__name__}: {exc}")
        return 1
    engine.start()
    out.send(ev="loaded", n_ctx=engine.config.n_ctx_slot)
    session = Session(engine, out)
    threading.Thread(target=session.report_stats, daemon=True).start()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "cancel":
            engine.cancel(cmd["id"])
        elif cmd["op"] == "generate":
            session.generate(cmd)
    engine.stop()  # the service closed our stdin: finish and exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
