"""Typed errors of the batching engine. They cross the engine pipe by the reason codes of
the service's error classes they extend: QueueFull is the service's EngineBusy (HTTP 429),
the others say the engine cannot serve (EngineUnavailable)."""

from __future__ import annotations

from meshllm.common.errors import EngineBusy, EngineUnavailable, MeshError


class BatchEngineError(EngineUnavailable):
    """Base of the batching engine's errors that leave a request unserved."""


class QueueFull(EngineBusy):
    """Every slot is busy and the waiting queue is at its bound: retry later (HTTP 429)."""

    def __init__(self, running: int, queued: int, max_queue: int) -> None:
        super().__init__(
            f"engine busy: {running} requests running, {queued} queued (queue bound {max_queue});"
            " retry later"
        )
        self.running = running
        self.queued = queued
        self.max_queue = max_queue


class DuplicateRequest(BatchEngineError):
    def __init__(self, request_id: str) -> None:
        super().__init__(f"request id {request_id!r} is already queued or running")
        self.request_id = request_id


class DecodeFailed(BatchEngineError):
    """llama_decode returned an error; the requests in that batch are failed."""

    def __init__(self, code: int) -> None:
        super().__init__(f"llama_decode failed with code {code}")
        self.code = code


class ModelLoadFailed(BatchEngineError):
    pass


class EngineStopped(BatchEngineError):
    """The engine was shut down; no more requests are accepted."""


class StepFailed(BatchEngineError):
    """An engine step raised something other than a mesh error."""


def engine_error(exc: BaseException) -> MeshError:
    """`exc` as the typed error a failed request reports."""
    if isinstance(exc, MeshError):
        return exc
    return StepFailed(f"{type(exc).__name__}: {exc}")
