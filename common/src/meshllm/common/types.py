"""Domain types: one frozen dataclass per wire concept.

Services pass these around; only `convert` knows the protobuf messages they map to.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NewType

WorkerId = NewType("WorkerId", str)
ModelId = NewType("ModelId", str)
RequestId = NewType("RequestId", str)


class LoadState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class ModelState:
    model_id: ModelId
    state: LoadState
    error: str = ""
    engine_restarts: int = 0


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: WorkerId
    address: str
    backend: str
    memory_budget_bytes: int
    threads: int
    started_at_unix_s: float
    models: tuple[ModelState, ...] = ()

    def model_state(self, model_id: ModelId) -> ModelState | None:
        return next((m for m in self.models if m.model_id == model_id), None)


@dataclass(frozen=True)
class ModelSpec:
    model_id: ModelId
    source: str
    weights_bytes: int
    n_layers: int
    context_length: int
    kv_bytes_per_token: int
    architecture: str
    train_context_length: int

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_bytes_per_token * self.context_length


@dataclass(frozen=True)
class Assignment:
    """One worker's share of a model: layers [layer_start, layer_end)."""

    worker_id: WorkerId
    layer_start: int
    layer_end: int


@dataclass(frozen=True)
class Placement:
    model_id: ModelId
    replicas: tuple[Assignment, ...]
    required_bytes: int
    unplaced_reason: str = ""

    @property
    def worker_ids(self) -> tuple[WorkerId, ...]:
        return tuple(a.worker_id for a in self.replicas)


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 0  # 0: until the context is full
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0


@dataclass(frozen=True)
class GenerateRequest:
    request_id: RequestId
    model_id: ModelId
    text: str | None = None
    chat: tuple[ChatMessage, ...] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenDelta:
    text: str
    tokens: int


@dataclass(frozen=True)
class Finished:
    finish_reason: str
    usage: Usage


GenerateEvent = TokenDelta | Finished


@dataclass(frozen=True)
class WorkerStats:
    worker_id: WorkerId
    running_requests: int
    queued_requests: int
    generated_tokens_total: int
    prompt_tokens_total: int
    models: tuple[ModelState, ...] = ()
