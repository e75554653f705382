"""Why the gateway could not answer, as typed mesh errors. The backend raises these; the
HTTP edge (`errors.api_error_for`) alone decides their status codes and OpenAI shape."""

from __future__ import annotations

from collections.abc import Sequence

from meshllm.common.errors import (
    EngineCrashed,
    EngineUnavailable,
    MeshError,
    ModelNotFound,
    Overloaded,
)


class UnknownModel(ModelNotFound):
    """No model of that name is configured in the mesh."""

    def __init__(self, model: str, served: Sequence[str]) -> None:
        listed = ", ".join(served) or "none"
        super().__init__(f"The model {model!r} does not exist. Models served here: {listed}.")
        self.model = model
        self.served = tuple(served)


class ModelAlreadyDeclared(MeshError):
    """POST /api/models for a model id that is declared already."""

    reason = "model_already_declared"


class NoLiveWorker(MeshError):
    """The model is known but no replica can take the request; the message is the
    planner's or the workers' reason (placement pending, fits nowhere, loading)."""

    reason = "no_live_worker"


class ReplicasBusy(Overloaded):
    """Every replica refused the request as busy: retry after a short wait."""

    reason = "replicas_busy"

    def __init__(self, model_id: str, refusals: Sequence[str]) -> None:
        super().__init__(f"every replica of {model_id} is busy: {'; '.join(refusals)}. "
                         f"Retry after a short wait.")
        self.refusals = tuple(refusals)


class ReplicasFailed(MeshError):
    """Every replica failed before sending a token."""

    reason = "worker_failed"

    def __init__(self, model_id: str, failures: Sequence[str]) -> None:
        super().__init__(f"every replica of {model_id} failed: {'; '.join(failures)}")
        self.failures = tuple(failures)


class StreamBroken(MeshError):
    """A worker failed after tokens were sent: no other replica can take over, and a
    stream must end with an error event."""

    reason = "stream_broken"


class IncompleteAnswer(MeshError):
    """A worker ended its stream cleanly but without the answer it owed."""

    reason = "incomplete_answer"


class WorkerSilent(MeshError):
    """A worker sent nothing for longer than the gateway waits."""

    reason = "worker_timeout"

    def __init__(self, worker_id: str, waited_s: float, answering: str = "") -> None:
        """`answering`: what is wrong with it when it still answers the watchdog."""
        super().__init__(f"worker {worker_id} sent nothing for {waited_s:.1f} s"
                         + (f" ({answering})" if answering else ""))
        self.worker_id = worker_id
        self.waited_s = waited_s
        self.answering = bool(answering)  # alive by its probes: slow or stuck, not gone


def refusal(error: MeshError | None) -> str:
    """How a worker turned a request down: "busy" (a full queue), "not now" (its engine is
    not there for now: loading, or stopped for a re-plan), or "" when it failed. Only a
    failure counts against the worker: banning one that refused for now would keep a lone
    split's re-planned head from its stream for the ban."""
    if isinstance(error, Overloaded):
        return "busy"
    if isinstance(error, EngineUnavailable) and not isinstance(error, EngineCrashed):
        return "not now"
    return ""
