"""API errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}.

`api_error_for` is the one place where a typed mesh error becomes an HTTP status and an
OpenAI error; request parsing, at the edge itself, raises `ApiError` directly."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshllm.common.blackboard.errors import (
    BlackboardError,
    BlackboardUnavailable,
    PostRejected,
    RateLimited,
    SecretDetected,
    TextTooLarge,
)
from meshllm.common.errors import (
    InvalidGenerateRequest,
    MeshError,
    ModelNotFound,
    Overloaded,
    PromptTooLong,
)
from meshllm.gateway.auth import InvalidApiKey, ModelNotAllowed
from meshllm.gateway.failures import (
    IncompleteAnswer,
    ModelAlreadyDeclared,
    NoLiveWorker,
    ReplicasFailed,
    StreamBroken,
    WorkerSilent,
)
from meshllm.gateway.key_limits import KeyRateExceeded, RequestRateExceeded, TokenRateExceeded
from meshllm.gateway.limits import InputLimitExceeded, RequestTooLarge
from starlette.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


@dataclass(frozen=True)
class ErrorShape:
    """How one family of mesh errors looks over HTTP."""

    status: int
    type: str
    param: str | None
    code: str | None
    reason_as_code: bool = False  # the error's own reason code is the API code


# The most specific class in an error's MRO that is listed here decides its shape.
API_ERRORS: dict[type[MeshError], ErrorShape] = {
    MeshError: ErrorShape(500, "server_error", None, None),
    InvalidGenerateRequest: ErrorShape(400, "invalid_request_error", None, None),
    PromptTooLong: ErrorShape(400, "invalid_request_error", "messages",
                              "context_length_exceeded"),
    ModelNotFound: ErrorShape(404, "invalid_request_error", "model", "model_not_found"),
    NoLiveWorker: ErrorShape(503, "service_unavailable", None, "no_live_worker"),
    ModelAlreadyDeclared: ErrorShape(409, "invalid_request_error", "model", None,
                                     reason_as_code=True),
    ReplicasFailed: ErrorShape(502, "server_error", None, "worker_failed"),
    StreamBroken: ErrorShape(502, "server_error", None, "worker_failed"),
    IncompleteAnswer: ErrorShape(502, "server_error", None, "worker_failed"),
    Overloaded: ErrorShape(429, "rate_limit_error", None, "model_overloaded"),
    WorkerSilent: ErrorShape(504, "server_error", None, "timeout"),
    BlackboardError: ErrorShape(502, "api_error", None, None, reason_as_code=True),
    PostRejected: ErrorShape(400, "invalid_request_error", None, None, reason_as_code=True),
    RateLimited: ErrorShape(429, "rate_limit_error", None, None, reason_as_code=True),
    TextTooLarge: ErrorShape(413, "invalid_request_error", "text", None, reason_as_code=True),
    SecretDetected: ErrorShape(422, "invalid_request_error", "text", None,
                               reason_as_code=True),
    BlackboardUnavailable: ErrorShape(503, "service_unavailable", None, None,
                                      reason_as_code=True),
    InvalidApiKey: ErrorShape(401, "invalid_request_error", None, "invalid_api_key"),
    ModelNotAllowed: ErrorShape(403, "invalid_request_error", "model", "model_not_allowed"),
    RequestRateExceeded: ErrorShape(429, "requests", None, "rate_limit_exceeded"),
    TokenRateExceeded: ErrorShape(429, "tokens", None, "rate_limit_exceeded"),
    InputLimitExceeded: ErrorShape(400, "invalid_request_error", None, None,
                                   reason_as_code=True),
    RequestTooLarge: ErrorShape(413, "invalid_request_error", None, None,
                                reason_as_code=True),
}


def shape_of(error: MeshError) -> ErrorShape:
    for cls in type(error).__mro__:
        if cls in API_ERRORS:
            return API_ERRORS[cls]
    raise AssertionError("MeshError is in the table")


def _headers(error: MeshError) -> dict[str, str]:
    if isinstance(error, RateLimited):
        return {"Retry-After": str(max(1, round(error.retry_after_s)))}
    if isinstance(error, KeyRateExceeded):  # a key's window: a second early is refused again
        return {"Retry-After": str(max(1, math.ceil(error.retry_after_s)))}
    if isinstance(error, InvalidApiKey):
        return {"WWW-Authenticate": "Bearer"}
    return {}


def api_error_for(error: MeshError) -> ApiError:
    """The OpenAI-shaped HTTP error for a typed mesh error."""
    shape = shape_of(error)
    code = error.reason if shape.reason_as_code else shape.code
    # an invalid request names the field at fault where the check that refused it knew it
    param = getattr(error, "param", "") or shape.param
    return ApiError(shape.status, str(error), shape.type, param, code, _headers(error))
