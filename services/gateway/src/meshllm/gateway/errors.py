"""API errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str, known: list[str]) -> ApiError:
    listed = ", ".join(known) or "none"
    return ApiError(404, f"The model {model!r} does not exist. Models served here: {listed}.",
                    "invalid_request_error", "model", "model_not_found")


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, "service_unavailable", None, "no_live_worker")


def overloaded(message: str) -> ApiError:
    return ApiError(429, message, "rate_limit_error", None, "model_overloaded")


def worker_failed(message: str) -> ApiError:
    return ApiError(502, message, "server_error", None, "worker_failed")
