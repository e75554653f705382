"""The starlette application: thin handlers over validation, the backend and formatting."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from meshllm.common import telemetry
from meshllm.common.demand import ModelDemand
from meshllm.common.errors import MeshError
from meshllm.common.meshview import MeshSnapshot
from meshllm.common.status import mesh_status
from meshllm.common.types import Finished, GenerateEvent, ModelId, TokenDelta, Usage
from meshllm.gateway import embeddings_api, responses
from meshllm.gateway.backend import MeshBackend
from meshllm.gateway.choices import ChoiceOutput, Traced, total_usage
from meshllm.gateway.errors import ApiError, api_error_for
from meshllm.gateway.failures import IncompleteAnswer
from meshllm.gateway.metrics import GatewayMetrics, RequestTimer
from meshllm.gateway.openai_api import ApiRequest, parse_chat, parse_completion, parse_json
from meshllm.gateway.responses_api import parse_responses
from meshllm.gateway.responses_endpoint import response_stream
from meshllm.gateway.responses_events import ResponseHead, full_response, new_id
from meshllm.gateway.routing import ready_replicas, serves_embeddings, serving_state
from meshllm.gateway.sessions import SESSION_HEADER
from meshllm.gateway.streaming import ChoiceStream
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

log = logging.getLogger(__name__)
Choice = tuple[int, GenerateEvent]  # an event of the choice with that index
DemandView = Callable[[], Mapping[ModelId, ModelDemand]]  # per model, merged over gateways


class Api:
    def __init__(self, backend: MeshBackend, metrics: GatewayMetrics,
                 tracer: telemetry.Tracer = telemetry.NO_TRACER,
                 demand: DemandView | None = None) -> None:
        self.backend = backend
        self.metrics = metrics
        self.tracer = tracer
        self.demand = demand or (lambda: {d.model_id: d for d in backend.demand.snapshot()})

    async def models(self, request: Request) -> Response:
        snapshot = self.backend.snapshot
        known = snapshot.models.keys() | snapshot.declarations.keys()
        data = [model_object(snapshot, model_id) for model_id in sorted(known)]
        return JSONResponse({"object": "list", "data": data})

    async def model(self, request: Request) -> Response:
        model_id = self.backend.resolve(request.path_params["model"])  # unknown: 404
        return JSONResponse(model_object(self.backend.snapshot, model_id))

    async def chat(self, request: Request) -> Response:
        return await self._complete(parse_chat(parse_json(await request.body()),
                                               request.headers.get(SESSION_HEADER, "")))

    async def completions(self, request: Request) -> Response:
        return await self._complete(parse_completion(parse_json(await request.body()),
                                                     request.headers.get(SESSION_HEADER, "")))

    def _traced(self, req: ApiRequest) -> Traced:
        def traced(events: AsyncGenerator[GenerateEvent, None]
                   ) -> AsyncGenerator[GenerateEvent, None]:
            return telemetry.traced_generation(
                self.tracer, telemetry.api_call(req.kind, req.model, req.sampling), events)
        return traced

    async def responses(self, request: Request) -> Response:
        req = parse_responses(parse_json(await request.body()),
                              request.headers.get(SESSION_HEADER, ""))
        head = ResponseHead(req, new_id("resp"), int(time.time()))
        timer, first, choices = await self._open(req.chat, head.response_id)
        if req.chat.stream:
            return StreamingResponse(
                response_stream(head, _chain(first, choices), choices, timer),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        outputs, usage = await self._gather(req.chat, first, choices, timer)
        choice = responses.choice_dict(req.chat, 0, outputs[0])
        return JSONResponse(full_response(head, choice["message"], choice["finish_reason"],
                                          usage, int(time.time())))

    async def _open(self, req: ApiRequest, rid: str
                    ) -> tuple[RequestTimer, Choice, AsyncGenerator[Choice, None]]:
        """The request's choices, started: errors before the first token are raised here,
        to become HTTP errors."""
        timer = self.metrics.request_timer(req.model, req.kind, rid)
        choices = self.backend.generate_choices(req, self._traced(req))
        try:
            first = await anext(choices)
        except StopAsyncIteration:
            timer.done("error")
            raise IncompleteAnswer("the worker ended the stream without an answer") from None
        except MeshError:
            timer.done("rejected")
            raise
        timer.first_token()
        return timer, first, choices

    async def _complete(self, req: ApiRequest) -> Response:
        rid = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        timer, first, choices = await self._open(req, rid)
        if req.stream:
            return StreamingResponse(
                self._stream(req, rid, created, first, choices, timer),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
            )
        return await self._collect(req, rid, created, first, choices, timer)

    async def _collect(self, req: ApiRequest, rid: str, created: int, first: Choice,
                       choices: AsyncIterator[Choice], timer: RequestTimer) -> Response:
        outputs, usage = await self._gather(req, first, choices, timer)
        return JSONResponse(responses.full_response(req, rid, created, outputs, usage))

    async def _gather(self, req: ApiRequest, first: Choice, choices: AsyncIterator[Choice],
                      timer: RequestTimer) -> tuple[list[ChoiceOutput], Usage]:
        outputs = [ChoiceOutput() for _ in range(req.n)]
        try:
            async for index, event in _chain(first, choices):
                outputs[index].add(event)
                if isinstance(event, TokenDelta):
                    timer.tokens(event.tokens)
        except MeshError:
            timer.done("error")
            raise
        finished = [out.finished for out in outputs if out.finished is not None]
        if len(finished) < req.n:
            timer.done("error")
            raise IncompleteAnswer("the worker ended the stream without a finish reason")
        usage = total_usage([f.usage for f in finished])
        timer.finished(Finished(finished[0].finish_reason, usage))
        timer.done("ok")
        return outputs, usage

    async def _stream(self, req: ApiRequest, rid: str, created: int, first: Choice,
                      choices: AsyncGenerator[Choice, None], timer: RequestTimer
                      ) -> AsyncIterator[bytes]:
        outcome = "cancelled"
        streams = [ChoiceStream(req, i) for i in range(req.n)]
        try:
            for stream in streams:
                for choice in stream.opening():
                    yield responses.sse(responses.chunk(req, rid, created, choice))
            ends: dict[int, Finished] = {}
            async for index, event in _chain(first, choices):
                if isinstance(event, TokenDelta):
                    timer.tokens(event.tokens)
                    out = streams[index].delta(event)
                else:
                    ends[index] = event
                    out = streams[index].finish(event)
                for choice in out:
                    yield responses.sse(responses.chunk(req, rid, created, choice))
            if len(ends) == req.n:
                usage = total_usage([end.usage for end in ends.values()])
                timer.finished(Finished(ends[0].finish_reason, usage))
                if req.include_usage:
                    yield responses.sse(responses.usage_chunk(req, rid, created, usage))
            outcome = "ok"
        except MeshError as exc:
            outcome = "error"
            log.warning("stream %s ended with an error: %s", rid, exc)
            yield responses.sse(api_error_for(exc).body())
        finally:
            timer.done(outcome)
            await choices.aclose()  # cancels the worker calls if the client went away
        yield responses.SSE_DONE

    async def health(self, request: Request) -> Response:
        synced = self.backend.synced.is_set()
        return JSONResponse({"status": "ok" if synced else "starting",
                             "workers": len(self.backend.snapshot.workers)},
                            status_code=200 if synced else 503)

    async def status(self, request: Request) -> Response:
        return JSONResponse(mesh_status(self.backend.snapshot, self.demand()).to_json())

    async def metrics_endpoint(self, request: Request) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)


def model_object(snapshot: MeshSnapshot, model_id: ModelId) -> dict[str, Any]:
    """A declared model in OpenAI's shape, with what it serves, its context (once read)
    and whether it serves (`status`: waiting, loading, serving, not_served) beside."""
    spec = snapshot.models.get(model_id)
    capabilities = ["generation", *(["embeddings"] if serves_embeddings(snapshot, model_id)
                                    else [])]
    state, reason = serving_state(snapshot, model_id)
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "mesh-llm",
            **({"context_length": spec.context_length} if spec else {}),
            "capabilities": capabilities,
            "ready_replicas": len(ready_replicas(snapshot, model_id)),
            "status": state.value, **({"status_reason": reason} if reason else {})}


async def _chain(first: Choice, rest: AsyncIterator[Choice]) -> AsyncIterator[Choice]:
    yield first
    async for event in rest:
        yield event


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _mesh_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MeshError)
    return api_error_for(exc).response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = "not_found" if exc.status_code == 404 else None
    return ApiError(exc.status_code, str(exc.detail), "invalid_request_error", None, code
                    ).response()


def build_app(api: Api, extra_routes: Sequence[BaseRoute] = (),
              lifespan: Callable[[Starlette], Any] | None = None) -> Starlette:
    routes: list[BaseRoute] = [
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.model, methods=["GET"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/responses", api.responses, methods=["POST"]),
        embeddings_api.route(api.backend, api.metrics),
        Route("/health", api.health, methods=["GET"]),
        Route("/api/status", api.status, methods=["GET"]),
        Route("/metrics", api.metrics_endpoint, methods=["GET"]),
        *extra_routes,
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={ApiError: _api_error, MeshError: _mesh_error,
                                         HTTPException: _http_error})
