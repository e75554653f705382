"""The gateway fuzzed with schemathesis from OpenAI's own OpenAPI document: for every
operation the gateway serves, requests generated from the official request schema (half of
them naming the model the mesh serves, generated token counts capped so a run stays short)
never get a 5xx, and every JSON answer is valid against the official response schema."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.support import openapi
from tests.support.mesh import LocalMesh
from tests.support.openapi import SPEC

pytestmark = pytest.mark.integration

SERVED = (("GET", "/models"), ("GET", "/models/{model}"), ("POST", "/chat/completions"),
          ("POST", "/completions"), ("POST", "/embeddings"), ("POST", "/responses"))
MODEL = "gemma3-270m"
MAX_NEW_TOKENS = 4
TOKEN_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# Without a cap a request generates to the end of the context: minutes on this machine.
CAP_KEY = {"/chat/completions": "max_completion_tokens", "/completions": "max_tokens",
           "/responses": "max_output_tokens"}
STREAM_SCHEMAS = {"/chat/completions": "CreateChatCompletionStreamResponse",
                  "/completions": "CreateCompletionResponse"}
MAX_EMBEDDING_INPUTS = 8  # the API allows 2048: each is a forward pass on two CPU cores
# Derandomized: CI runs the same requests every time, so a failure reproduces.
FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def schema() -> Any:
    if not SPEC.is_file():
        pytest.skip(f"OpenAI's OpenAPI document is not at {SPEC}")
    return schemathesis.openapi.from_path(str(SPEC))


def tame(path: str, body: Any, real_model: bool) -> None:
    """Keep a generated body meaningful to the mesh and short to answer: a served model
    in half the cases, at most a few new tokens, few choices and embedding inputs."""
    if not isinstance(body, dict):
        return
    if real_model:
        body["model"] = MODEL
    if path in CAP_KEY and not any(key in body for key in TOKEN_KEYS):
        body[CAP_KEY[path]] = MAX_NEW_TOKENS
    for key in TOKEN_KEYS:
        if isinstance(body.get(key), int) and body[key] > MAX_NEW_TOKENS:
            body[key] = MAX_NEW_TOKENS
    if isinstance(body.get("n"), int) and body["n"] > 2:
        body["n"] = 2
    if isinstance(body.get("input"), list):
        del body["input"][MAX_EMBEDDING_INPUTS:]


def is_stream(response: Any) -> bool:
    value = response.headers.get("content-type") or [""]  # schemathesis: lists of values
    return str(value[0] if isinstance(value, list) else value).startswith("text/event-stream")


def conformance(case: Any, response: Any) -> list[Any]:
    """The official response-schema check, where the document describes the answer: not
    for streams (schemathesis validates the SSE envelope, not its data, against the chunk
    schema) nor base64 embeddings (the document types `embedding` as a list of floats only,
    though the API answers a string for encoding_format base64)."""
    if is_stream(response):
        return []
    if isinstance(case.body, dict) and case.body.get("encoding_format") == "base64":
        return []
    return [response_schema_conformance]


def check_stream(path: str, text: str) -> None:
    """Every event of a stream is valid against its official schema, or is an error."""
    for line in text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        data = json.loads(line[len("data: "):])
        if path == "/responses":
            openapi.check_event(data)
        elif "error" in data:
            assert {"message", "type", "param", "code"} <= set(data["error"]), data
        else:
            openapi.check(STREAM_SCHEMAS[path], data)


@pytest.mark.parametrize(("method", "path"), SERVED)
def test_official_requests_get_no_server_error_and_valid_answers(
        schema: Any, mesh: LocalMesh, method: str, path: str) -> None:
    operation = schema[path][method]
    session = requests.Session()

    @FUZZ
    @given(case=operation.as_strategy(), real_model=st.booleans())
    def check(case: Any, real_model: bool) -> None:
        tame(path, case.body, real_model)
        if "model" in (case.path_parameters or {}) and real_model:
            case.path_parameters["model"] = MODEL
        response = case.call(base_url=mesh.base_url + "/v1", session=session, timeout=120)
        case.validate_response(response, checks=[not_a_server_error, *conformance(case, response)])
        if is_stream(response):
            check_stream(path, response.text)

    check()
