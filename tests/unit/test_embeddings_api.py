"""/v1/embeddings: parsing and validation of the four input forms, the encodings, the
dimensions rule, and the answer's shape through the route over a scripted backend."""

from __future__ import annotations

import base64
import struct
from typing import Any

import numpy as np
import pytest
from meshllm.common.errors import InvalidGenerateRequest
from meshllm.common.types import Embeddings, EmbedInput
from meshllm.gateway.embeddings_api import (
    MAX_INPUTS,
    EmbeddingsRequest,
    check_dimensions,
    embeddings_response,
    encoded,
    parse_embeddings,
    route,
)
from meshllm.gateway.errors import ApiError, api_error_for
from meshllm.gateway.metrics import GatewayMetrics
from starlette.applications import Starlette
from starlette.testclient import TestClient


@pytest.mark.parametrize(("value", "inputs"), [
    ("hello", ("hello",)),
    (["a", "b c"], ("a", "b c")),
    ([2, 651, 9], ((2, 651, 9),)),
    ([[2, 651], [7]], ((2, 651), (7,))),
    (["a", [5]], ("a", (5,))),  # mixed lists are accepted item by item
], ids=["string", "strings", "token ids", "token lists", "mixed"])
def test_the_input_forms(value: object, inputs: tuple[EmbedInput, ...]) -> None:
    req = parse_embeddings({"model": "m", "input": value})
    assert req == EmbeddingsRequest("m", inputs, "float", None)


@pytest.mark.parametrize(("body", "param", "problem"), [
    ({"input": "x"}, "model", "model is required"),
    ({"model": "", "input": "x"}, "model", "model is required"),
    ({"model": "m"}, "input", "input is required"),
    ({"model": "m", "input": ""}, "input", "empty string"),
    ({"model": "m", "input": []}, "input", "non-empty"),
    ({"model": "m", "input": ["a", ""]}, "input", r"input\[1\] is an empty string"),
    ({"model": "m", "input": [[]]}, "input", r"input\[0\] is an empty list"),
    ({"model": "m", "input": [[1, -2]]}, "input", "token ids"),
    ({"model": "m", "input": [[1, True]]}, "input", "token ids"),
    ({"model": "m", "input": [[1, 1 << 32]]}, "input", "token ids"),
    ({"model": "m", "input": [1.5]}, "input", "string or an array"),
    ({"model": "m", "input": {"text": "x"}}, "input", "non-empty string or array"),
    ({"model": "m", "input": ["x"] * (MAX_INPUTS + 1)}, "input", "at most 2048"),
    ({"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format", "one of"),
    ({"model": "m", "input": "x", "dimensions": 0}, "dimensions", "positive"),
    ({"model": "m", "input": "x", "dimensions": "8"}, "dimensions", "positive"),
    ({"model": "m", "input": "x", "user": 5}, "user", "string"),
], ids=["no model", "empty model", "no input", "empty string", "empty list",
        "empty item", "empty token list", "negative id", "bool id", "id too big",
        "float item", "object", "too many", "encoding", "zero dimensions",
        "dimensions text", "user"])
def test_bad_requests_are_400_naming_the_field(body: dict[str, Any], param: str,
                                              problem: str) -> None:
    with pytest.raises(ApiError, match=problem) as info:
        parse_embeddings(body)
    assert (info.value.status, info.value.param) == (400, param)
    assert info.value.body()["error"]["type"] == "invalid_request_error"


def test_options_are_read() -> None:
    req = parse_embeddings({"model": "m", "input": "x", "encoding_format": "base64",
                            "dimensions": 640, "user": "u-1"})
    assert (req.encoding_format, req.dimensions) == ("base64", 640)
    assert parse_embeddings({"model": "m", "input": "x", "encoding_format": None}
                            ).encoding_format == "float"


def test_base64_is_float32_little_endian_as_the_official_client_decodes() -> None:
    vector = (0.5, -0.25, 1.0 / 3.0)
    raw = base64.b64decode(encoded(vector, "base64"))  # type: ignore[arg-type]
    assert raw == struct.pack("<3f", *vector)
    # the openai client: np.frombuffer(base64.b64decode(data), dtype="float32")
    decoded = np.frombuffer(raw, dtype="float32").tolist()
    assert decoded == [float(np.float32(x)) for x in vector]
    assert encoded(vector, "float") == list(vector)


def test_dimensions_other_than_the_models_width_are_unsupported() -> None:
    check_dimensions(EmbeddingsRequest("m", ("x",), dimensions=None), 640)
    check_dimensions(EmbeddingsRequest("m", ("x",), dimensions=640), 640)
    with pytest.raises(ApiError, match="640 dimensions") as info:
        check_dimensions(EmbeddingsRequest("m", ("x",), dimensions=256), 640)
    body = info.value.body()["error"]
    assert (body["param"], body["code"]) == ("dimensions", "unsupported_value")


def test_the_answer_has_openais_shape() -> None:
    req = EmbeddingsRequest("m", ("a", "b"))
    answer = embeddings_response(req, Embeddings(((0.5, 0.5), (1.0, 0.0)), 7))
    assert answer == {
        "object": "list", "model": "m", "usage": {"prompt_tokens": 7, "total_tokens": 7},
        "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.5]},
                 {"object": "embedding", "index": 1, "embedding": [1.0, 0.0]}]}


class ScriptedBackend:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[EmbedInput, ...]]] = []
        self.metrics = GatewayMetrics()  # what the route records, checked by the test

    async def embed(self, model: str, inputs: tuple[EmbedInput, ...]) -> Embeddings:
        self.calls.append((model, inputs))
        if inputs == ((999999,),):
            raise InvalidGenerateRequest("input 0: token id 999999 is outside", "input")
        return Embeddings(tuple((1.0, 0.0, 0.0) for _ in inputs), 3 * len(inputs))


@pytest.fixture
def http() -> tuple[TestClient, ScriptedBackend]:
    backend = ScriptedBackend()

    async def mesh_error(request: Any, exc: Exception) -> Any:
        assert isinstance(exc, InvalidGenerateRequest)
        return api_error_for(exc).response()

    async def api_error(request: Any, exc: Exception) -> Any:
        assert isinstance(exc, ApiError)
        return exc.response()

    app = Starlette(routes=[route(backend, backend.metrics)], exception_handlers={
        ApiError: api_error, InvalidGenerateRequest: mesh_error})
    return TestClient(app), backend


def test_the_route_answers_and_maps_errors(http: tuple[TestClient, ScriptedBackend]) -> None:
    client, backend = http
    r = client.post("/v1/embeddings", json={"model": "m", "input": ["a", [5, 6]],
                                            "encoding_format": "base64"})
    assert r.status_code == 200
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    assert np.frombuffer(base64.b64decode(data[1]["embedding"]), "float32").tolist() == [
        1.0, 0.0, 0.0]
    assert backend.calls == [("m", ("a", (5, 6)))]
    r = client.post("/v1/embeddings", json={"model": "m", "input": [999999]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = client.post("/v1/embeddings", json={"model": "m", "input": "x", "dimensions": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_value"
    r = client.post("/v1/embeddings", content=b"{not json")
    assert r.status_code == 400
    count = backend.metrics.registry.get_sample_value
    assert count("meshllm_gateway_requests_total", {"model": "m", "outcome": "ok"}) == 1
    assert count("meshllm_gateway_requests_total", {"model": "m", "outcome": "rejected"}) == 2
    assert count("meshllm_gateway_prompt_tokens_total", {"model": "m"}) == 6
    assert [r.operation for r in backend.metrics.recent.latest()][:1] == ["embeddings"]
