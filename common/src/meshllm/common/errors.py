"""Typed errors. Each says what went wrong and what to do; the edges (gRPC servicers,
HTTP handlers, the CLI) map them to status codes."""

from __future__ import annotations


class MeshError(Exception):
    """Base of every error mesh-llm raises on purpose."""


class ConfigError(MeshError):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"configuration {key}: {problem}")
        self.key = key


class InvalidRecord(MeshError):
    """A record read from the network (etcd, a peer) failed validation."""


class ModelNotFound(MeshError):
    pass


class ModelSourceError(MeshError):
    """A model name or path could not be resolved to a readable GGUF file."""


class PromptTooLong(MeshError):
    def __init__(self, prompt_tokens: int, context_length: int) -> None:
        super().__init__(
            f"This model's maximum context length is {context_length} tokens, "
            f"but the prompt is {prompt_tokens} tokens. Shorten the prompt or the messages."
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class InvalidGenerateRequest(MeshError):
    pass


class EngineUnavailable(MeshError):
    """The engine for a model is not loaded, is loading, or crashed."""


class EngineCrashed(EngineUnavailable):
    pass


class EngineBusy(MeshError):
    """Every slot is busy and the engine's queue is full: retry later or elsewhere."""
