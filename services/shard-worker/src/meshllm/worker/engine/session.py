"""The engine process's side of the wire: commands become engine submissions, engine
events become wire events."""

from __future__ import annotations

import threading
import time

import meshllm.worker.engine_wire as wire
from meshllm.common.errors import MeshError
from meshllm.common.types import RequestId, Usage
from meshllm.worker.engine.batch import BatchEngine, Delta, EngineStats, Event, Finished
from meshllm.worker.engine.batch.embed import EmbedResult
from meshllm.worker.engine.channel import Channel

STATS_PERIOD_S = 1.0


class Session:
    def __init__(self, engine: BatchEngine, out: Channel) -> None:
        self._engine = engine
        self._out = out
        self._times: dict[str, list[int]] = {}  # request id -> [started_ns, first_token_ns]
        self._lock = threading.Lock()

    def handle(self, command: wire.Command) -> None:
        if isinstance(command, wire.Generate):
            self.generate(command)
        elif isinstance(command, wire.Cancel):
            self._engine.cancel(command.request_id)
        elif isinstance(command, wire.Embed):
            self.embed(command)
        elif isinstance(command, wire.SetLinkRtt):
            self._engine.set_link_rtt(command.rtt_s)
        else:
            raise wire.MalformedEngineMessage("a second load command: the model is loaded")

    def generate(self, command: wire.Generate) -> None:
        rid = command.request_id
        with self._lock:
            self._times[rid] = [time.time_ns(), 0]
        try:
            tokens, stops = self._engine.prompt_tokens(command.text, command.chat,
                                                       command.tools_json)
            self._engine.submit(rid, tokens, command.sampling, self.on_event, stops=stops,
                                grammar=command.grammar, logprobs=command.logprobs,
                                resume=command.resume)
        except MeshError as exc:  # too long, invalid, queue full: the request's answer
            with self._lock:
                self._times.pop(rid, None)
            self._out.send(wire.Error(rid, wire.WireError.of(exc)))

    def embed(self, command: wire.Embed) -> None:
        rid = command.request_id

        def answer(result: EmbedResult | MeshError) -> None:
            if isinstance(result, EmbedResult):
                self._out.send(wire.Embedded(rid, result.vectors, result.prompt_tokens))
            else:
                self._out.send(wire.Error(rid, wire.WireError.of(result)))

        try:
            self._engine.submit_embed(rid, command.inputs, answer)
        except MeshError as exc:  # an invalid input, a split model, the queue full
            answer(exc)

    def on_event(self, event: Event) -> None:
        rid = RequestId(event.request_id)
        if isinstance(event, Delta):
            with self._lock:
                times = self._times.get(rid)
                if times is not None and not times[1]:
                    times[1] = time.time_ns()
            self._out.send(wire.Delta(rid, event.text, event.tokens, event.logprobs,
                                      event.sent_ids, event.draws))
            return
        with self._lock:
            started, first = self._times.pop(rid, [0, 0])
        if isinstance(event, Finished):
            usage = Usage(event.prompt_tokens, event.completion_tokens,
                          event.cached_prompt_tokens)
            self._out.send(wire.Finished(rid, event.reason, usage, started, first))
        else:
            self._out.send(wire.Error(rid, wire.WireError.of(event.error)))

    def report_stats(self) -> None:
        """Sends the engine's counters when they changed, every STATS_PERIOD_S (forever)."""
        last: EngineStats | None = None
        while True:
            now = self._engine.stats()
            if now != last:
                self._out.send(wire.Stats(now))
                last = now
            time.sleep(STATS_PERIOD_S)
