"""Engines behind an interface: the service talks to `Engine`; `ProcessEngine` runs
llama.cpp in a child process (`meshllm.worker.engine`) so that a native crash spares the
service. The two speak `engine_wire` and nothing else."""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from meshllm.common import telemetry
from meshllm.common.errors import EngineCrashed, EngineUnavailable
from meshllm.common.types import (
    Embeddings,
    EmbedRequest,
    Finished,
    GenerateEvent,
    GenerateRequest,
    TokenDelta,
)
from meshllm.worker import engine_wire as wire
from meshllm.worker.child import ChildProcess
from meshllm.worker.warm_engines import WarmEngines

log = logging.getLogger(__name__)

# An engine that does not exit this long after its input closed is killed: it holds nothing
# worth a clean exit, and one stuck in a native call (a read from a frozen split stage)
# never will, while its replacement waits.
STOP_GRACE_S = 1.0


def stop_grace_s(load: wire.Load) -> float:
    """How long a stopping engine may take to exit before it is killed: none for a split's
    head, which is stopped when its split is re-planned, most often because a stage died or
    froze, and then sits in a read from that stage for ever (a second lost per frozen
    stage); its streams move on from the tokens the gateway already has either way."""
    return 0.0 if load.rpc_endpoints else STOP_GRACE_S


def float32_values(raw: bytes) -> tuple[float, ...]:
    """A vector as the engine sends it (float32 little-endian) as numbers."""
    values = array.array("f", raw)
    if sys.byteorder != "little":
        values.byteswap()
    return tuple(values)


def finished_event(finished: wire.Finished, submitted_ns: int, ended_ns: int) -> Finished:
    """The end of a generation with how long it queued for a slot and was in one. An engine
    that reported no start (0) had it queue for nothing; clocks that disagree give 0."""
    started_ns = finished.started_ns or submitted_ns
    return Finished(finished.finish_reason, finished.usage,
                    queued_s=max(0, started_ns - submitted_ns) / 1e9,
                    service_s=max(0, ended_ns - started_ns) / 1e9)


DEFAULT_LOAD_TIMEOUT_S = 600.0


def engine_argv(log_level: str) -> list[str]:
    return [sys.executable, "-m", "meshllm.worker.engine", "--log-level", log_level]

# What a request's stream receives: its events, or None once the engine process is gone.
StreamEvent = wire.Delta | wire.Finished | wire.Embedded | wire.Error | None


@dataclass(frozen=True)
class EngineSettings:
    load: wire.Load                  # what the engine loads: its first command
    child_env: Mapping[str, str]     # the engine process's whole environment
    on_progress: Callable[[float], None] | None = None  # weights loaded so far, 0..1
    load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S
    log_level: str = wire.DEFAULT_LOG_LEVEL


class Engine(Protocol):
    async def start(self) -> None: ...
    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]: ...
    async def embed(self, request: EmbedRequest) -> Embeddings:
        """One vector per input, batched in the engine; raises typed errors."""
        ...
    @property
    def stats(self) -> wire.EngineStats:
        """The engine's last report of its counters."""
        ...
    async def wait_exited(self) -> int: ...
    async def stop(self) -> None: ...


class ProcessEngine:
    """One model in one child process; requests are multiplexed over its pipes."""

    def __init__(self, settings: EngineSettings,
                 tracer: telemetry.Tracer = telemetry.NO_TRACER,
                 warm: WarmEngines | None = None) -> None:
        self._settings = settings
        self._tracer = tracer
        self._warm = warm
        self._proc: ChildProcess | None = None
        self._streams: dict[str, asyncio.Queue[StreamEvent]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._stats = wire.EngineStats()
        self._stopping = False

    @property
    def stats(self) -> wire.EngineStats:
        return self._stats

    async def start(self) -> None:
        s = self._settings
        argv = engine_argv(s.log_level)
        self._proc = await (ChildProcess.start(argv, s.child_env, pipes=True)
                            if self._warm is None else self._warm.start(argv, s.child_env))
        self._send(s.load)
        try:
            await self._await_loaded()
        except EngineUnavailable:
            await self.stop()
            raise
        finally:
            if self._warm is not None:
                self._warm.prepare(argv, s.child_env)  # for the next load
        self._reader = asyncio.create_task(self._read_events())

    def _load_failed(self, why: str) -> EngineUnavailable:
        return EngineUnavailable(f"loading {self._settings.load.model_path.name} failed: {why}")

    async def _await_loaded(self) -> None:
        """Waits for the engine's answer to the load command, reporting progress."""
        assert self._proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.load_timeout_s
        while True:
            try:
                line = await asyncio.wait_for(self._proc.read_line(),
                                              max(0.0, deadline - loop.time()))
                event = wire.decode_event(line) if line else None
            except TimeoutError:
                raise self._load_failed(
                    f"no answer within {self._settings.load_timeout_s:.0f}s") from None
            except wire.MalformedEngineMessage as exc:
                raise self._load_failed(str(exc)) from exc
            if isinstance(event, wire.Progress):
                if self._settings.on_progress is not None:
                    self._settings.on_progress(event.fraction)
                continue
            if isinstance(event, wire.Loaded):
                return
            if isinstance(event, wire.LoadFailed):
                raise self._load_failed(event.error.message) from event.error.rebuild()
            raise self._load_failed("engine process exited" if event is None
                                    else f"unexpected {type(event).__name__} event")

    def set_link_rtt(self, rtt_s: float) -> None:
        """The split's step round trip changed (links.py): the engine's draft tuner takes it
        from its next step on; raises EngineCrashed when the engine is gone."""
        self._send(wire.SetLinkRtt(rtt_s))

    def _send(self, command: wire.Command) -> None:
        if self._proc is None or self._proc.returncode is not None:
            raise EngineCrashed("the engine process is not running")
        self._proc.write_line(wire.encode(command))

    async def _read_events(self) -> None:
        assert self._proc is not None
        try:
            while line := await self._proc.read_line():
                if not self._dispatch(line):
                    self._proc.kill()
                    break
        finally:
            # Also when stop() cancels this reader before the end of the output reached it
            # (a killed engine's pipe may close later, or never while a descendant holds
            # it): a stream nobody ends waits for ever.
            for stream in self._streams.values():
                stream.put_nowait(None)

    def _dispatch(self, line: bytes) -> bool:
        """Hands one event to its stream; False when the engine cannot be understood."""
        try:
            event = wire.decode_event(line)
        except wire.MalformedEngineMessage as exc:
            # An engine that cannot be understood is as good as crashed: restart it.
            log.error("stopping the engine of %s: %s", self._settings.load.model_path.name, exc)
            return False
        if isinstance(event, wire.Stats):
            self._stats = event.stats
        elif isinstance(event, wire.Delta | wire.Finished | wire.Embedded | wire.Error):
            stream = self._streams.get(event.request_id)
            if stream is not None:
                stream.put_nowait(event)
        else:
            log.warning("ignoring a %s event after loading", type(event).__name__)
        return True

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        stream: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self._streams[request.request_id] = stream
        done = False
        try:
            if self._reader is None or self._reader.done():
                raise EngineCrashed("the engine process is not running")
            submitted_ns = time.time_ns()
            self._send(wire.Generate.of(request))
            while not done:
                event = await stream.get()
                if event is None:
                    raise await self._ended()
                if isinstance(event, wire.Error):
                    raise event.error.rebuild()
                if isinstance(event, wire.Delta):
                    yield TokenDelta(event.text, event.tokens, event.logprobs, event.sent_ids,
                                     event.draws)
                    continue
                if isinstance(event, wire.Embedded):
                    raise EngineCrashed("the engine answered a generation with embeddings")
                done = True
                ended_ns = time.time_ns()
                self._trace_phases(request, submitted_ns, event, ended_ns)
                yield finished_event(event, submitted_ns, ended_ns)
        finally:
            del self._streams[request.request_id]
            if not done and self._proc is not None and self._proc.returncode is None:
                with contextlib.suppress(EngineCrashed):
                    self._send(wire.Cancel(request.request_id))

    async def embed(self, request: EmbedRequest) -> Embeddings:
        stream: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self._streams[request.request_id] = stream
        try:
            if self._reader is None or self._reader.done():
                raise EngineCrashed("the engine process is not running")
            self._send(wire.Embed.of(request))
            event = await stream.get()
        finally:
            del self._streams[request.request_id]
        if event is None:
            raise await self._ended()
        if isinstance(event, wire.Error):
            raise event.error.rebuild()
        if not isinstance(event, wire.Embedded):
            raise EngineCrashed(f"the engine answered an embedding with {type(event).__name__}")
        return Embeddings(tuple(float32_values(v) for v in event.vectors), event.prompt_tokens)

    def _trace_phases(self, request: GenerateRequest, submitted_ns: int,
                      finished: wire.Finished, ended_ns: int) -> None:
        phases = telemetry.EnginePhases(submitted_ns, finished.started_ns,
                                        finished.first_token_ns, ended_ns)
        telemetry.record_engine_phases(self._tracer, phases, {
            "gen_ai.request.model": request.model_id,
            "gen_ai.usage.input_tokens": finished.usage.prompt_tokens,
            "gen_ai.usage.output_tokens": finished.usage.completion_tokens})

    async def _ended(self) -> EngineUnavailable:
        """Why a request's events stopped short: a stop (the model was re-placed, or the
        worker closes: its replica may take it again once reloaded) or a crash."""
        code = await self.wait_exited()
        if self._stopping:
            return EngineUnavailable(f"the engine of {self._settings.load.model_path.name} "
                                     "was stopped while it ran this request")
        return EngineCrashed(f"the engine process died (exit code {code})")

    async def wait_exited(self) -> int:
        assert self._proc is not None
        return await self._proc.wait()

    async def stop(self) -> None:
        """Ends the engine; the requests it still runs end with EngineUnavailable."""
        self._stopping = True
        if self._proc is not None and self._proc.returncode is None:
            self._proc.close_stdin()  # the engine exits when its input ends
            try:
                await asyncio.wait_for(self._proc.wait(), stop_grace_s(self._settings.load))
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        if self._reader is not None:
            self._reader.cancel()
