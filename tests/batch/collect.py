"""Collects engine events per request."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshllm.common.types import TokenLogprob
from meshllm.worker.engine.batch import BatchEngine, Delta, Event, Failed, Finished


@dataclass
class Collector:
    text: dict[str, str] = field(default_factory=dict)
    ids: dict[str, list[int]] = field(default_factory=dict)
    deltas: dict[str, list[Delta]] = field(default_factory=dict)
    finished: dict[str, Finished] = field(default_factory=dict)
    failed: dict[str, Failed] = field(default_factory=dict)
    log: list[Event] = field(default_factory=list)
    logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)

    def __call__(self, ev: Event) -> None:
        self.log.append(ev)
        if isinstance(ev, Delta):
            self.text[ev.request_id] = self.text.get(ev.request_id, "") + ev.text
            self.deltas.setdefault(ev.request_id, []).append(ev)
            self.ids.setdefault(ev.request_id, []).extend(ev.token_ids)
            self.logprobs.setdefault(ev.request_id, []).extend(ev.logprobs)
        elif isinstance(ev, Finished):
            self.finished[ev.request_id] = ev
        else:
            self.failed[ev.request_id] = ev


def drain(engine: BatchEngine, max_steps: int = 100_000) -> int:
    steps = 0
    while engine.step():
        steps += 1
        assert steps < max_steps, "the engine does not finish"
    return steps
