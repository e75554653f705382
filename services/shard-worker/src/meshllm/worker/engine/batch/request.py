"""One request's life inside a slot: prompt progress, sampling state and streamed output."""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from meshllm.worker.engine.batch.events import Delta, Event, Finished, OnEvent
from meshllm.worker.engine.batch.sampling import SamplerSpec
from meshllm.worker.engine.batch.stops import StopMatcher


@dataclass(frozen=True)
class Submission:
    request_id: str
    prompt: tuple[int, ...]
    spec: SamplerSpec
    stops: tuple[str, ...]
    limit: int  # most completion tokens (max_tokens capped by the slot's context)
    on_event: OnEvent


class Active:
    """Mutable by design: the engine thread alone advances it, one step at a time."""

    def __init__(self, sub: Submission, reused: int, admitted: int,
                 piece: Callable[[int], bytes], is_eog: Callable[[int], bool]) -> None:
        self.sub = sub
        self.done = reused  # prompt tokens in the KV
        self.reused = reused
        self.admitted = admitted
        self.generated: list[int] = []
        self.rng = np.random.Generator(np.random.PCG64(sub.spec.seed))
        self.reason: str | None = None
        self._piece, self._is_eog = piece, is_eog
        self._matcher = StopMatcher(sub.stops)
        self._stop_hit = False
        # A token may end inside a UTF-8 sequence: decode incrementally.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def prompt_left(self) -> int:
        return len(self.sub.prompt) - self.done

    @property
    def remaining(self) -> int:
        return self.sub.limit - len(self.generated)

    def history(self, extra: Sequence[int] = ()) -> list[int]:
        return [*self.sub.prompt, *self.generated, *extra]

    def emit(self, tokens: Sequence[int], out: list[Event]) -> int:
        """Appends tokens until one ends the request; returns how many were taken."""
        text, start = "", len(self.generated)
        for token in tokens:
            if self._is_eog(token):
                self.reason = "stop"
                break
            self.generated.append(token)
            piece, stopped = self._matcher.feed(self._decoder.decode(self._piece(token)))
            text += piece
            if stopped:
                self.reason, self._stop_hit = "stop", True
                break
            if self.remaining <= 0:
                self.reason = "length"
                break
        taken = tuple(self.generated[start:])
        if taken or text:
            out.append(Delta(self.sub.request_id, text, len(taken), taken))
        return len(taken)

    def finish(self, reason: str, out: list[Event]) -> None:
        self.reason = reason
        # Nothing follows a stop string, not even held-back bytes.
        tail = "" if self._stop_hit else (
            self._matcher.flush() + self._decoder.decode(b"", final=True))
        if tail:
            out.append(Delta(self.sub.request_id, tail, 0))
        out.append(Finished(self.sub.request_id, reason, len(self.sub.prompt), self.reused,
                            len(self.generated)))
