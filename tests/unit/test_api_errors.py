"""Mesh errors at the HTTP edge: every row of the table, and the app answering with it
(before the first token as an HTTP error, after it as an error event then [DONE])."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any, cast

import pytest
from meshllm.common.blackboard.errors import (
    BlackboardError,
    BlackboardUnavailable,
    PostRejected,
    RateLimited,
    SecretDetected,
    TextTooLarge,
)
from meshllm.common.errors import (
    EngineBusy,
    EngineCrashed,
    InvalidGenerateRequest,
    MeshError,
    ModelNotFound,
    Overloaded,
    PromptTooLong,
)
from meshllm.common.store import KeyValueStore
from meshllm.common.types import GenerateEvent, TokenDelta
from meshllm.gateway.app import Api, build_app
from meshllm.gateway.auth import InvalidApiKey, ModelNotAllowed
from meshllm.gateway.backend import MeshBackend
from meshllm.gateway.config import StreamTiming
from meshllm.gateway.errors import API_ERRORS, api_error_for
from meshllm.gateway.failures import (
    IncompleteAnswer,
    ModelAlreadyDeclared,
    NoLiveWorker,
    ReplicasBusy,
    ReplicasFailed,
    StreamBroken,
    UnknownModel,
    WorkerSilent,
)
from meshllm.gateway.key_limits import RequestRateExceeded, TokenRateExceeded
from meshllm.gateway.limits import InputLimitExceeded, NestingTooDeep, RequestTooLarge
from meshllm.gateway.metrics import GatewayMetrics
from meshllm.gateway.openai_api import ApiRequest
from starlette.testclient import TestClient

# (error, status, type, param, code); the README's error table documents these.
ROWS: list[tuple[MeshError, int, str, str | None, str | None]] = [
    (MeshError("unexpected"), 500, "server_error", None, None),
    (InvalidGenerateRequest("stop sequence too long"), 400, "invalid_request_error", None,
     None),
    (PromptTooLong(5000, 4096), 400, "invalid_request_error", "messages",
     "context_length_exceeded"),
    (ModelNotFound("no model x"), 404, "invalid_request_error", "model", "model_not_found"),
    (UnknownModel("gpt-9", ["a", "b"]), 404, "invalid_request_error", "model",
     "model_not_found"),
    (NoLiveWorker("model m has not been placed yet"), 503, "service_unavailable", None,
     "no_live_worker"),
    (ModelAlreadyDeclared("model m is declared already"), 409, "invalid_request_error",
     "model", "model_already_declared"),
    (ReplicasFailed("m", ["w1: UNAVAILABLE gone"]), 502, "server_error", None,
     "worker_failed"),
    (StreamBroken("worker w1: UNAVAILABLE gone after the stream began"), 502, "server_error",
     None, "worker_failed"),
    (IncompleteAnswer("the worker ended the stream without an answer"), 502, "server_error",
     None, "worker_failed"),
    (Overloaded("too much at once"), 429, "rate_limit_error", None, "model_overloaded"),
    (ReplicasBusy("m", ["w1: RESOURCE_EXHAUSTED full"]), 429, "rate_limit_error", None,
     "model_overloaded"),
    (WorkerSilent("w1", 60.0), 504, "server_error", None, "timeout"),
    (BlackboardError("node failed"), 502, "api_error", None, "blackboard_error"),
    (PostRejected("reply_to names no post"), 400, "invalid_request_error", None, "invalid_post"),
    (RateLimited("slow down", 2.4), 429, "rate_limit_error", None, "rate_limited"),
    (TextTooLarge("too big"), 413, "invalid_request_error", "text", "text_too_large"),
    (SecretDetected("looks like a key"), 422, "invalid_request_error", "text",
     "secret_detected"),
    (BlackboardUnavailable("cannot reach"), 503, "service_unavailable", None, "unavailable"),
    (InvalidApiKey("Incorrect API key provided."), 401, "invalid_request_error", None,
     "invalid_api_key"),
    (ModelNotAllowed("alice", "m"), 403, "invalid_request_error", "model", "model_not_allowed"),
    (RequestRateExceeded("60 requests per minute", 3.0), 429, "requests", None,
     "rate_limit_exceeded"),
    (TokenRateExceeded("1000 tokens per minute", 3.0), 429, "tokens", None,
     "rate_limit_exceeded"),
    (InputLimitExceeded("n may be at most 4", "n"), 400, "invalid_request_error", "n",
     "input_limit_exceeded"),
    (NestingTooDeep("deeper than 64"), 400, "invalid_request_error", None, "json_too_deep"),
    (RequestTooLarge("larger than 4 MiB"), 413, "invalid_request_error", None,
     "request_too_large"),
]


@pytest.mark.parametrize(("error", "status", "type_", "param", "code"), ROWS,
                         ids=[type(r[0]).__name__ for r in ROWS])
def test_api_error_for(error: MeshError, status: int, type_: str, param: str | None,
                       code: str | None) -> None:
    api = api_error_for(error)
    assert api.status == status
    assert api.body() == {"error": {"message": str(error), "type": type_, "param": param,
                                    "code": code}}


def test_every_row_of_the_table_is_tested() -> None:
    assert {type(r[0]) for r in ROWS} >= set(API_ERRORS)


class OddPost(PostRejected):
    reason = "test_odd_post"


@pytest.mark.parametrize(("error", "status", "code"), [
    (EngineBusy("queue full"), 429, "model_overloaded"),
    (EngineCrashed("exit code 134"), 500, None),  # the backend never lets it through
    (OddPost("odd"), 400, "test_odd_post"),  # blackboard codes are the reason codes
])
def test_unlisted_subclass_takes_its_nearest_row(error: MeshError, status: int,
                                                 code: str | None) -> None:
    assert (api_error_for(error).status, api_error_for(error).code) == (status, code)


@pytest.mark.parametrize(("retry_after_s", "header"), [(2.4, "2"), (0.2, "1"), (0.0, "1")])
def test_rate_limited_says_when_to_retry(retry_after_s: float, header: str) -> None:
    response = api_error_for(RateLimited("slow down", retry_after_s)).response()
    assert response.headers["Retry-After"] == header
    assert "Retry-After" not in api_error_for(ReplicasBusy("m", [])).response().headers


def test_unknown_model_lists_what_is_served() -> None:
    assert str(UnknownModel("gpt-9", [])).endswith("Models served here: none.")
    assert "Models served here: a, b." in str(UnknownModel("gpt-9", ["a", "b"]))


class ScriptedBackend(MeshBackend):
    """Sends `tokens` deltas, then raises `error`."""

    def __init__(self, error: MeshError, tokens: int) -> None:
        super().__init__(cast(KeyValueStore, object()), StreamTiming(1.0, 1.0))
        self.error = error
        self.tokens = tokens

    async def generate(self, req: ApiRequest) -> AsyncGenerator[GenerateEvent, None]:
        for _ in range(self.tokens):
            yield TokenDelta("hi", 1)
        raise self.error


def _client(error: MeshError, tokens: int = 0) -> TestClient:
    return TestClient(build_app(Api(ScriptedBackend(error, tokens), GatewayMetrics())))


BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("error", "status", "type_", "param", "code"), ROWS[:12],
                         ids=[type(r[0]).__name__ for r in ROWS[:12]])
@pytest.mark.parametrize("stream", [False, True])
def test_error_before_the_first_token_is_an_http_error(
        error: MeshError, status: int, type_: str, param: str | None, code: str | None,
        stream: bool) -> None:
    r = _client(error).post("/v1/chat/completions", json={**BODY, "stream": stream})
    assert r.status_code == status
    assert r.json() == {"error": {"message": str(error), "type": type_, "param": param,
                                  "code": code}}


@pytest.mark.parametrize(("error", "code"), [
    (StreamBroken("worker w1: UNAVAILABLE gone after the stream began"), "worker_failed"),
    (WorkerSilent("w1", 60.0), "timeout"),
])
def test_error_mid_stream_is_an_error_event_then_done(error: MeshError, code: str) -> None:
    r = _client(error, tokens=2).post("/v1/chat/completions", json={**BODY, "stream": True})
    assert r.status_code == 200
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2]) == {"error": {"message": str(error), "type": "server_error",
                                                "param": None, "code": code}}


def test_error_mid_answer_is_an_http_error() -> None:
    error = StreamBroken("worker w1: UNAVAILABLE gone after the stream began")
    r = _client(error, tokens=2).post("/v1/chat/completions", json=BODY)
    assert r.status_code == 502 and r.json()["error"]["code"] == "worker_failed"


def test_request_validation_keeps_its_shape() -> None:
    r = _client(MeshError("unused")).post("/v1/chat/completions",
                                          json={**BODY, "functions": [{"name": "f"}]})
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "functions: the legacy functions parameter is not supported; use tools",
        "type": "invalid_request_error", "param": "functions", "code": "unsupported_parameter"}
