"""Streams that survive a dead node: what the gateway keeps of each request in flight so
that another replica can carry it on, and which replicas may.

The worker tells the gateway, with each delta, the tokens whose text it has started to send
and how far the request's seeded generator has drawn. When the worker fails, the request
goes to another replica as a `Resume`: that replica prefills the prompt and those tokens,
replays their text through its stop matcher (text held back stays held), rebuilds the
grammar state from them and skips the generator ahead, then continues. With reproducible
kernels (docs/determinism.md) the client gets exactly the stream an undisturbed run gives.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from meshllm.common.meshview import MeshSnapshot
from meshllm.common.types import (
    GenerateEvent,
    GenerateRequest,
    ModelId,
    Replica,
    RequestId,
    Resume,
    TokenDelta,
    WorkerId,
)


def replica_headed_by(snapshot: MeshSnapshot, model_id: ModelId, worker_id: WorkerId
                      ) -> Replica | None:
    placement = snapshot.placements.get(model_id)
    if placement is None:
        return None
    return next((r for r in placement.replicas if r.head.worker_id == worker_id), None)


REST_S = 0.5  # a replica that refused a moving stream is asked again after this long


@dataclass
class StreamRun:
    """One request across the replicas it runs on. Mutable by design: the one task that
    streams the request updates it, event by event."""

    request: GenerateRequest
    sent_ids: list[int] = field(default_factory=list)
    draws: int = 0
    started: bool = False        # an event reached the client: a failure now means a move
    migrations: int = 0
    resumptions: int = 0  # resumed requests sent, each under its own id (next_request)
    failed_at_s: float | None = None  # monotonic time of the failure being recovered from
    cause: str = ""
    # Replicas that failed this request, as they were then: a worker that comes back with
    # other stages (a split re-planned around a dead stage) may take it again.
    failed: dict[WorkerId, Replica | None] = field(default_factory=dict)

    def saw(self, event: GenerateEvent) -> None:
        self.started = True
        if isinstance(event, TokenDelta) and event.sent_ids:
            self.sent_ids.extend(event.sent_ids)
            self.draws = event.draws

    def next_request(self) -> GenerateRequest:
        """What the next replica is sent: the request itself, or its resumption, each under
        an id of its own: a replica asked again after the watchdog gave up on it may still
        hold the abandoned attempt (its cancel lands at the engine's next step), and would
        refuse the same id as already running."""
        if not self.started:
            return self.request
        self.resumptions += 1
        resume = Resume(tuple(self.sent_ids), self.draws, self.migrations)
        attempt = RequestId(f"{self.request.request_id}-resume{self.resumptions}")
        return dataclasses.replace(self.request, request_id=attempt, resume=resume)

    # Replicas that refused it for now (busy, loading, an engine restarting): they may try
    # again after REST_S (monotonic time they may).
    resting: dict[WorkerId, float] = field(default_factory=dict)

    # Replicas that failed it while they still answered the watchdog (slow or stuck, not
    # gone): asked again, after REST_S, when no other replica may take the stream.
    answering: set[WorkerId] = field(default_factory=set)

    def failed_on(self, worker_id: WorkerId, replica: Replica | None, cause: str,
                  answering: bool = False) -> None:
        self.failed[worker_id] = replica
        if answering:
            self.answering.add(worker_id)
            self.resting[worker_id] = time.monotonic() + REST_S
        self._interrupted(cause)

    def may_retry(self, worker_id: WorkerId) -> bool:
        """Whether a replica that failed this request while alive may have it back, as a
        last resort (a lone split whose first steps after a re-plan were slow)."""
        return (worker_id in self.answering
                and self.resting.get(worker_id, 0.0) <= time.monotonic())

    def refused_by(self, worker_id: WorkerId, cause: str, moved: bool = False) -> None:
        """A replica would not take it for now (busy, loading, not placed there any more):
        not a move, so not counted against max_migrations; migrate_wait_s bounds these.
        One that had streamed it and stopped for now (an engine stopped for a re-plan) is
        not to blame either, but the stream moves: its tokens are replayed elsewhere."""
        self.resting[worker_id] = time.monotonic() + REST_S
        self._interrupted(cause, moved)

    def _interrupted(self, cause: str, moved: bool = True) -> None:
        if self.started:
            self.migrations += moved
            if self.failed_at_s is None:  # the client has waited since the first failure
                self.failed_at_s, self.cause = time.monotonic(), cause

    def may_take(self, worker_id: WorkerId, replica: Replica | None) -> bool:
        """Whether a replica may be tried: not one that already failed this request as it
        is now, nor one that refused it less than REST_S ago."""
        if self.resting.get(worker_id, 0.0) > time.monotonic():
            return False
        return worker_id not in self.failed or self.failed[worker_id] != replica

    def resumed(self) -> float | None:
        """Seconds from the failure to the first event of the replica that carried the
        stream on, when one just did (then forgotten: it is counted once)."""
        if self.failed_at_s is None:
            return None
        waited, self.failed_at_s = time.monotonic() - self.failed_at_s, None
        return waited


def may_take(run: StreamRun, snapshot: MeshSnapshot, worker_id: WorkerId) -> bool:
    return run.may_take(worker_id, replica_headed_by(snapshot, run.request.model_id, worker_id))
