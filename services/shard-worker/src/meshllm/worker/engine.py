"""Engines behind an interface: the service talks to `Engine`; `ProcessEngine` runs
llama.cpp in a child process (see engine_proc) so that a native crash spares the service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from meshllm.common import telemetry
from meshllm.common.errors import (
    EngineBusy,
    EngineCrashed,
    EngineUnavailable,
    InvalidGenerateRequest,
    MeshError,
)
from meshllm.common.types import Finished, GenerateEvent, GenerateRequest, TokenDelta, Usage
from meshllm.worker.child import ChildProcess

log = logging.getLogger(__name__)

_EXITED: dict[str, Any] = {"ev": "exited"}


@dataclass(frozen=True)
class EngineSettings:
    model_path: Path
    context_length_tokens: int
    threads: int
    rpc_endpoints: tuple[str, ...] = ()   # stages of a split, in layer order
    tensor_split: tuple[float, ...] = ()  # layers on each stage
    n_gpu_layers: int = 0                 # layers on the stages (the last ones)
    weight_repack: bool = False           # faster CPU kernels, but split != whole output
    on_progress: Callable[[float], None] | None = None  # weights loaded so far, 0..1
    slots: int = 1                        # requests decoded together
    max_queue: int = 16                   # requests waiting for a slot before "busy"
    speculative: str = "none"             # none | ngram | draft:<path>
    rpc_library: str = "meshllm"          # meshllm | stock ggml-rpc build for the stages
    load_timeout_s: float = 600.0


class Engine(Protocol):
    async def start(self) -> None: ...
    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]: ...
    async def wait_exited(self) -> int: ...
    async def stop(self) -> None: ...


def _request_command(request: GenerateRequest) -> dict[str, Any]:
    sampling = asdict(request.sampling)
    sampling["stop"] = list(request.sampling.stop)
    chat = [asdict(m) for m in request.chat] if request.chat is not None else None
    return {"op": "generate", "id": request.request_id, "text": request.text, "chat": chat,
            "sampling": sampling}


def _event(ev: dict[str, Any]) -> GenerateEvent:
    if ev["ev"] == "delta":
        return TokenDelta(ev["text"], int(ev["tokens"]))
    return Finished(ev["finish_reason"], Usage(int(ev["prompt_tokens"]),
                                               int(ev["completion_tokens"]),
                                               int(ev.get("cached_tokens", 0))))


def _error(ev: dict[str, Any]) -> MeshError:
    """The engine's refusal as the service's typed error."""
    if ev.get("kind") == "QueueFull":
        return EngineBusy(ev["message"])
    if ev.get("kind") in ("PromptTooLong", "InvalidGenerateRequest"):
        return InvalidGenerateRequest(ev["message"])
    return EngineUnavailable(f"{ev.get('kind')}: {ev['message']}")


class ProcessEngine:
    """One model in one child process; requests are multiplexed over its pipes."""

    def __init__(self, settings: EngineSettings,
                 tracer: telemetry.Tracer = telemetry.NO_TRACER) -> None:
        self._settings = settings
        self._tracer = tracer
        self._proc: ChildProcess | None = None
        self._streams: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.stats: dict[str, Any] = {}  # the engine's last report: running, queued, ...

    async def start(self) -> None:
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}  # ggml would attach gdb on abort: slow
        self._proc = await ChildProcess.start(
            [sys.executable, "-m", "meshllm.worker.engine_proc"], env, pipes=True)
        s = self._settings
        self._send({"op": "load", "path": str(s.model_path),
                          "n_ctx": s.context_length_tokens, "n_threads": s.threads,
                          "rpc_endpoints": list(s.rpc_endpoints),
                          "tensor_split": list(s.tensor_split), "n_gpu_layers": s.n_gpu_layers,
                          "weight_repack": s.weight_repack, "slots": s.slots,
                          "max_queue": s.max_queue, "speculative": s.speculative,
                          "rpc_library": s.rpc_library})
        first = await self._first_event()
        if first.get("ev") != "loaded":
            await self.stop()
            raise EngineUnavailable(f"loading {s.model_path.name} failed: "
                                    f"{first.get('error', 'engine process exited')}")
        self._reader = asyncio.create_task(self._read_events())

    async def _first_event(self) -> dict[str, Any]:
        """The engine's answer to the load command, reporting progress on the way."""
        assert self._proc is not None
        deadline = asyncio.get_running_loop().time() + self._settings.load_timeout_s
        while True:
            left = deadline - asyncio.get_running_loop().time()
            try:
                line = await asyncio.wait_for(self._proc.read_line(), max(0.0, left))
            except TimeoutError:
                return {"error": f"no answer within {self._settings.load_timeout_s:.0f}s"}
            event = dict(json.loads(line)) if line else {}
            if event.get("ev") != "progress":
                return event
            if self._settings.on_progress is not None:
                self._settings.on_progress(float(event["fraction"]))

    def _send(self, command: dict[str, Any]) -> None:
        if self._proc is None or self._proc.returncode is not None:
            raise EngineCrashed("the engine process is not running")
        self._proc.write_line((json.dumps(command) + "\n").encode())

    async def _read_events(self) -> None:
        assert self._proc is not None
        while line := await self._proc.read_line():
            event = json.loads(line)
            if event.get("ev") == "stats":
                self.stats = event
                continue
            stream = self._streams.get(event.get("id", ""))
            if stream is not None:
                stream.put_nowait(event)
        for stream in self._streams.values():
            stream.put_nowait(_EXITED)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        stream: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._streams[request.request_id] = stream
        done = False
        try:
            if self._reader is None or self._reader.done():
                raise EngineCrashed("the engine process is not running")
            submitted_ns = time.time_ns()
            self._send(_request_command(request))
            while not done:
                event = await stream.get()
                if event is _EXITED:
                    code = await self.wait_exited()
                    raise EngineCrashed(f"the engine process died (exit code {code})")
                if event["ev"] == "error":
                    raise _error(event)
                done = event["ev"] == "finished"
                if done:
                    self._trace_phases(request, submitted_ns, event)
                yield _event(event)
        finally:
            del self._streams[request.request_id]
            if not done and self._proc is not None and self._proc.returncode is None:
                with contextlib.suppress(EngineCrashed):
                    self._send({"op": "cancel", "id": request.request_id})

    def _trace_phases(self, request: GenerateRequest, submitted_ns: int,
                      finished: dict[str, Any]) -> None:
        phases = telemetry.EnginePhases(
            submitted_ns, int(finished.get("started_ns", submitted_ns)),
            int(finished.get("first_token_ns", 0)), time.time_ns())
        telemetry.record_engine_phases(self._tracer, phases, {
            "gen_ai.request.model": request.model_id,
            "gen_ai.usage.input_tokens": int(finished["prompt_tokens"]),
            "gen_ai.usage.output_tokens": int(finished["completion_tokens"])})

    async def wait_exited(self) -> int:
        assert self._proc is not None
        return await self._proc.wait()

    async def stop(self) -> None:
        if self._proc is None or self._proc.returncode is not None:
            return
        self._proc.close_stdin()  # the engine exits when its input ends
        try:
            await asyncio.wait_for(self._proc.wait(), 5.0)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()
        if self._reader is not None:
            self._reader.cancel()
