"""POST /v1/embeddings (issue 13): the request parsed and validated, and the answer
formatted, by pure functions; the handler between them only calls the backend.

`input` is a string, a list of strings, a list of token ids or a list of token-id lists
(OpenAI's four forms). `encoding_format` "base64" is each vector's float32 values in
little-endian bytes, which is what the official client asks for by default and decodes.
`dimensions` is refused unless it is the model's own width: the mesh does not shorten
vectors. `user` is accepted and not used.
"""

from __future__ import annotations

import base64
import sys
import time
import uuid
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from meshllm.common.errors import MeshError
from meshllm.common.types import Embeddings, EmbedInput
from meshllm.gateway.errors import ApiError, invalid
from meshllm.gateway.openai_api import parse_json
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

MAX_INPUTS = 2048         # as OpenAI: inputs in one request
MAX_TOKEN_ID = (1 << 32) - 1  # what the worker's wire carries; the model checks its vocab
ENCODINGS = ("float", "base64")


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str
    inputs: tuple[EmbedInput, ...]
    encoding_format: str = "float"  # float | base64
    dimensions: int | None = None   # must be the model's width when given


def _is_token(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tokens(value: list[Any], where: str) -> tuple[int, ...]:
    if not value:
        raise invalid(f"{where} is an empty list of tokens", "input")
    if not all(_is_token(t) and 0 <= t <= MAX_TOKEN_ID for t in value):
        raise invalid(f"{where} must hold only token ids (integers from 0)", "input")
    return tuple(value)


def _inputs(value: object) -> tuple[EmbedInput, ...]:
    """The four forms of `input`, each input non-empty."""
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(_is_token(t) for t in value):
        value = [value]  # one input as token ids
    if not isinstance(value, list) or not value:
        raise invalid("input must be a non-empty string or array", "input")
    if len(value) > MAX_INPUTS:
        raise invalid(f"input holds {len(value)} items; at most {MAX_INPUTS} per request",
                      "input")
    inputs: list[EmbedInput] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not item:
                raise invalid(f"input[{i}] is an empty string", "input")
            inputs.append(item)
        elif isinstance(item, list):
            inputs.append(_tokens(item, f"input[{i}]"))
        else:
            raise invalid(f"input[{i}] must be a string or an array of token ids", "input")
    return tuple(inputs)


def parse_embeddings(data: Mapping[str, Any]) -> EmbeddingsRequest:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model is required", "model")
    if "input" not in data:
        raise invalid("input is required", "input")
    encoding = data.get("encoding_format")
    if encoding is None:
        encoding = "float"
    if encoding not in ENCODINGS:
        raise invalid(f"encoding_format must be one of {', '.join(ENCODINGS)}",
                      "encoding_format")
    dimensions = data.get("dimensions")
    if dimensions is not None and not (_is_token(dimensions) and dimensions >= 1):
        raise invalid("dimensions must be a positive integer", "dimensions")
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user must be a string", "user")
    return EmbeddingsRequest(model, _inputs(data["input"]), encoding, dimensions)


def check_dimensions(req: EmbeddingsRequest, width: int) -> None:
    if req.dimensions is not None and req.dimensions != width:
        raise invalid(f"dimensions {req.dimensions} is not supported: this model's vectors "
                      f"have {width} dimensions, which is the only value accepted",
                      "dimensions", "unsupported_value")


def encoded(vector: Sequence[float], encoding_format: str) -> list[float] | str:
    """A vector as the request asked: numbers, or base64 of float32 little-endian bytes."""
    if encoding_format == "float":
        return list(vector)
    values = array("f", vector)
    if sys.byteorder != "little":
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode("ascii")


def embeddings_response(req: EmbeddingsRequest, embeddings: Embeddings) -> dict[str, Any]:
    data = [{"object": "embedding", "index": i,
             "embedding": encoded(v, req.encoding_format)}
            for i, v in enumerate(embeddings.vectors)]
    usage = {"prompt_tokens": embeddings.prompt_tokens,
             "total_tokens": embeddings.prompt_tokens}
    return {"object": "list", "data": data, "model": req.model, "usage": usage}


class EmbeddingsBackend(Protocol):
    """What the handler needs of the mesh backend (gateway.backend.MeshBackend)."""

    async def embed(self, model: str, inputs: tuple[EmbedInput, ...]) -> Embeddings: ...


class EmbeddingsMetrics(Protocol):
    """What the handler records (gateway.metrics.GatewayMetrics)."""

    def embedded(self, model: str, outcome: str, duration_s: float, prompt_tokens: int,
                 request_id: str) -> None: ...


def route(backend: EmbeddingsBackend, metrics: EmbeddingsMetrics) -> Route:
    """The /v1/embeddings route over `backend`."""

    async def embeddings(request: Request) -> Response:
        req = parse_embeddings(parse_json(await request.body()))
        start, rid = time.perf_counter(), f"embd-{uuid.uuid4().hex[:24]}"
        try:
            result = await backend.embed(req.model, req.inputs)
            check_dimensions(req, len(result.vectors[0]) if result.vectors else 0)
        except (MeshError, ApiError):
            metrics.embedded(req.model, "rejected", time.perf_counter() - start, 0, rid)
            raise
        metrics.embedded(req.model, "ok", time.perf_counter() - start, result.prompt_tokens,
                         rid)
        return JSONResponse(embeddings_response(req, result))

    return Route("/v1/embeddings", embeddings, methods=["POST"])
