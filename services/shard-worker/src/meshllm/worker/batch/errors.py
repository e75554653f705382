"""Typed errors of the batching engine; the service maps QueueFull to HTTP 429."""

from __future__ import annotations

from meshllm.common.errors import MeshError


class BatchEngineError(MeshError):
    """Base of the batching engine's errors."""


class QueueFull(BatchEngineError):
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
