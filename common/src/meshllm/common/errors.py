"""Typed errors. Each says what went wrong and what to do; the edges (gRPC servicers,
HTTP handlers, the CLI) map them to status codes.

Every error that may cross a process boundary has a stable `reason` code. The code and
the error's `wire_details()` travel with it (gRPC trailing metadata, the engine pipe), and
`rebuild()` makes the same typed error on the other side, so no one matches messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar


class MeshError(Exception):
    """Base of every error mesh-llm raises on purpose."""

    reason: ClassVar[str] = "mesh_error"

    def wire_details(self) -> Mapping[str, str]:
        """Structured fields that travel beside the message (none by default)."""
        return {}

    @classmethod
    def from_wire(cls, message: str, details: Mapping[str, str]) -> MeshError:
        """The error as the sender raised it. Classes whose constructor takes more than
        the message override this; the default keeps the message as sent."""
        error = cls.__new__(cls)
        Exception.__init__(error, message)
        return error


class ConfigError(MeshError):
    reason = "bad_configuration"

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"configuration {key}: {problem}")
        self.key = key


class InvalidRecord(MeshError):
    """A record read from the network (etcd, a peer) failed validation."""

    reason = "invalid_record"


class MalformedMessage(MeshError):
    """A gRPC request whose bytes are not a message of the method's request type: a
    client built from other protos, or not a mesh-llm client at all."""

    reason = "malformed_message"


class ModelNotFound(MeshError):
    reason = "model_not_found"


class ModelSourceError(MeshError):
    """A model name or path could not be resolved to a readable GGUF file."""

    reason = "model_source"


class InvalidGenerateRequest(MeshError):
    """The request cannot be served as asked; the message names what to change and
    `param` the request field at fault (when one is)."""

    reason = "invalid_request"

    def __init__(self, message: str, param: str = "") -> None:
        super().__init__(message)
        self.param = param

    def wire_details(self) -> Mapping[str, str]:
        return {"param": self.param} if self.param else {}

    @classmethod
    def from_wire(cls, message: str, details: Mapping[str, str]) -> MeshError:
        if cls is InvalidGenerateRequest:
            return cls(message, details.get("param", ""))
        return super().from_wire(message, details)


class PromptTooLong(InvalidGenerateRequest):
    reason = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, context_length: int) -> None:
        super().__init__(
            f"This model's maximum context length is {context_length} tokens, "
            f"but the prompt is {prompt_tokens} tokens. Shorten the prompt or the messages.",
            "messages")
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length

    def wire_details(self) -> Mapping[str, str]:
        return {"prompt_tokens": str(self.prompt_tokens),
                "context_length": str(self.context_length)}

    @classmethod
    def from_wire(cls, message: str, details: Mapping[str, str]) -> MeshError:
        try:
            return cls(int(details["prompt_tokens"]), int(details["context_length"]))
        except (KeyError, ValueError):
            return super().from_wire(message, details)


class EngineUnavailable(MeshError):
    """The engine for a model is not loaded, is loading, or crashed."""

    reason = "engine_unavailable"


class EngineCrashed(EngineUnavailable):
    reason = "engine_crashed"


class Overloaded(MeshError):
    """Too much work at once: retry later or elsewhere."""

    reason = "overloaded"


class EngineBusy(Overloaded):
    """Every slot is busy and the engine's queue is full: retry later or elsewhere."""

    reason = "engine_busy"


def _declared(cls: type[MeshError]) -> dict[str, type[MeshError]]:
    found = {cls.reason: cls} if "reason" in vars(cls) else {}
    for sub in cls.__subclasses__():
        found.update(_declared(sub))
    return found


def error_types() -> dict[str, type[MeshError]]:
    """Reason code -> the class that declares it, over every error class imported so far."""
    return _declared(MeshError)


def rebuild(reason: str, message: str, details: Mapping[str, str] | None = None) -> MeshError:
    """The typed error a reason code and message stand for; an unknown code gives a
    plain MeshError that keeps the message."""
    cls = error_types().get(reason, MeshError)
    return cls.from_wire(message, details or {})
