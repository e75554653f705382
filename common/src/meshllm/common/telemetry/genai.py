"""Spans for model calls, following the OpenTelemetry GenAI semantic conventions, and the
engine's phases recorded after the fact."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from meshllm.common.types import Finished, GenerateEvent, GenerateRequest, SamplingParams
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace import Tracer as Tracer  # re-exported: services annotate with it
from opentelemetry.util.types import AttributeValue

T = TypeVar("T")

PROVIDER_NAME = "mesh-llm"  # gen_ai.provider.name: the mesh is the provider clients talk to
NO_TRACER: Tracer = trace.NoOpTracer()  # stateless: the default where tracing is not wired


def operation_name(request: GenerateRequest) -> str:
    return "chat" if request.chat is not None else "text_completion"


def request_attributes(operation: str, model: str, s: SamplingParams
                       ) -> dict[str, AttributeValue]:
    attrs: dict[str, AttributeValue] = {
        "gen_ai.operation.name": operation, "gen_ai.provider.name": PROVIDER_NAME,
        "gen_ai.request.model": model, "gen_ai.request.temperature": s.temperature,
        "gen_ai.request.top_p": s.top_p}
    if s.max_tokens:
        attrs["gen_ai.request.max_tokens"] = s.max_tokens
    if s.seed is not None:  # attributes are signed 64-bit; the wire's seed is unsigned
        attrs["gen_ai.request.seed"] = s.seed - (1 << 64) if s.seed >= 1 << 63 else s.seed
    if s.stop:
        attrs["gen_ai.request.stop_sequences"] = list(s.stop)
    if s.top_k:
        attrs["gen_ai.request.top_k"] = s.top_k
    if s.presence_penalty:
        attrs["gen_ai.request.presence_penalty"] = s.presence_penalty
    if s.frequency_penalty:
        attrs["gen_ai.request.frequency_penalty"] = s.frequency_penalty
    return attrs


def finish_attributes(model: str, finished: Finished) -> dict[str, AttributeValue]:
    return {"gen_ai.response.model": model,
            "gen_ai.response.finish_reasons": [finished.finish_reason],
            "gen_ai.usage.input_tokens": finished.usage.prompt_tokens,
            "gen_ai.usage.output_tokens": finished.usage.completion_tokens}


@dataclass(frozen=True)
class GenAiCall:
    """One model call as a span: `{operation} {model}` with the request's attributes."""

    operation: str
    model: str
    sampling: SamplingParams
    kind: SpanKind = SpanKind.CLIENT
    extra: Mapping[str, AttributeValue] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.operation} {self.model}"


def api_operation(kind: str) -> str:
    """The GenAI operation name of an OpenAI request (`kind`: "chat" or "completion")."""
    return "chat" if kind == "chat" else "text_completion"


def api_call(kind: str, model: str, sampling: SamplingParams) -> GenAiCall:
    """The gateway's span for an OpenAI request (`kind`: "chat" or "completion")."""
    return GenAiCall(api_operation(kind), model, sampling)


def worker_call(request: GenerateRequest, worker_id: str) -> GenAiCall:
    return GenAiCall(operation_name(request), request.model_id, request.sampling,
                     SpanKind.INTERNAL, {"meshllm.request_id": request.request_id,
                                         "meshllm.worker_id": worker_id})


async def _next_within(ctx: otel_context.Context, items: AsyncIterator[T]) -> T | None:
    """The next item, computed with `ctx` current: what the inner generator starts (a gRPC
    call, an engine span) gets the right parent. Attached and detached within one step,
    because a generator may be resumed from another task than the one that started it."""
    token = otel_context.attach(ctx)
    try:
        return await anext(items, None)
    finally:
        otel_context.detach(token)


class _Watch:
    """What a stream of events tells about its call, written onto its span."""

    def __init__(self, span: Span, model: str) -> None:
        self.span = span
        self.model = model
        self.started_ns = time.monotonic_ns()
        self.first_token_s: float | None = None
        self.finished = False

    def see(self, event: GenerateEvent) -> None:
        if isinstance(event, Finished):
            self.finished = True
            self.span.set_attributes(finish_attributes(self.model, event))
        elif event.tokens and self.first_token_s is None:
            self.first_token_s = (time.monotonic_ns() - self.started_ns) / 1e9
            self.span.add_event("gen_ai.first_token")
            self.span.set_attribute("meshllm.time_to_first_token_s", self.first_token_s)


def _failed(span: Span, exc: BaseException) -> str:
    """The outcome of a call that raised; a client going away is no error of the call."""
    if isinstance(exc, GeneratorExit | asyncio.CancelledError):
        return "cancelled"
    span.record_exception(exc)
    span.set_attribute("error.type", type(exc).__name__)
    span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
    return "error"


async def traced_generation(tracer: Tracer, call: GenAiCall,
                            events: AsyncIterator[GenerateEvent]
                            ) -> AsyncGenerator[GenerateEvent, None]:
    """`events`, unchanged, inside a GenAI span that ends with the stream (finished,
    failed, or closed early by a client that went away)."""
    span = tracer.start_span(call.name, kind=call.kind, attributes={
        **request_attributes(call.operation, call.model, call.sampling), **call.extra})
    ctx = trace.set_span_in_context(span)
    watch = _Watch(span, call.model)
    outcome = "cancelled"
    try:
        while (event := await _next_within(ctx, events)) is not None:
            watch.see(event)
            yield event
        outcome = "ok" if watch.finished else "incomplete"
    except BaseException as exc:
        outcome = _failed(span, exc)
        raise
    finally:
        span.set_attribute("meshllm.outcome", outcome)
        span.end()
        if isinstance(events, AsyncGenerator):  # stops the call below when a client left
            await events.aclose()


def record_route(tracer: Tracer, model: str, candidates: Sequence[str]) -> None:
    """The routing decision as a span of its own: the replicas in the order they will be
    tried (the first is chosen; the rest are fallbacks)."""
    span = tracer.start_span(f"route {model}", attributes={
        "gen_ai.request.model": model, "meshllm.route.candidates": list(candidates),
        "meshllm.route.chosen": candidates[0] if candidates else ""})
    if not candidates:
        span.set_status(Status(StatusCode.ERROR, "no ready replica"))
    span.end()


def record_migration(tracer: Tracer, model: str, to_worker: str, cause: str,
                     resume_s: float, replayed_tokens: int) -> None:
    """A stream carried on by another replica after its worker failed, as a span covering
    the time from the failure to the new replica's first event."""
    end_ns = time.time_ns()
    span = tracer.start_span(f"migrate {model}", start_time=end_ns - int(resume_s * 1e9),
                             attributes={"gen_ai.request.model": model,
                                         "meshllm.migration.cause": cause,
                                         "meshllm.migration.to": to_worker,
                                         "meshllm.migration.replayed_tokens": replayed_tokens})
    span.end(end_time=end_ns)


def current_trace_id() -> str:
    """The id of the trace the current span belongs to, as 32 hex digits; empty when there
    is none or it is not sampled (nothing of it is recorded anywhere to look up)."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return ""
    return format(context.trace_id, "032x")


# --- engine phases -------------------------------------------------------------------------


@dataclass(frozen=True)
class EnginePhases:
    """Wall-clock times (time.time_ns, comparable across processes on one host)."""

    submitted_ns: int        # the service handed the request to the engine
    started_ns: int          # the engine took it up, after waiting its turn
    first_token_ns: int      # prompt processed, first token sampled (0: none came)
    finished_ns: int


def phase_intervals(p: EnginePhases) -> list[tuple[str, int, int]]:
    """(name, start, end) of queueing, prompt processing and decoding; empty ones omitted."""
    started = min(max(p.started_ns, p.submitted_ns), p.finished_ns)
    first = min(max(p.first_token_ns, started), p.finished_ns) if p.first_token_ns else 0
    phases = [("engine.queue", p.submitted_ns, started),
              ("engine.prompt", started, first or p.finished_ns)]
    if first:
        phases.append(("engine.decode", first, p.finished_ns))
    return [(name, start, end) for name, start, end in phases if end >= start]


def record_engine_phases(tracer: Tracer, phases: EnginePhases,
                         attributes: Mapping[str, AttributeValue] | None = None) -> None:
    """Spans for the engine's phases, children of the current span, created after the
    fact from the times the engine reported."""
    for name, start, end in phase_intervals(phases):
        span = tracer.start_span(name, start_time=start, attributes=attributes)
        span.end(end_time=end)
