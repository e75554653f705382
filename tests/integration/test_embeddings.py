"""/v1/embeddings through the real mesh (gateway, workers running llama.cpp on gemma3-270m)
with the official client and LangChain's OpenAIEmbeddings, as their docs show.

gemma3-270m is a base causal LM: its mean-pooled vectors are not trained for similarity, so
nothing here asserts that similar texts come out closer. What is checked: shapes, unit
length, usage, determinism, float equal to base64, token arrays equal to their text, and
bad input answered 400 in OpenAI's shape."""

from __future__ import annotations

import math
from collections.abc import Sequence

import httpx
import openai
import pytest
from meshllm.common.models import materialize

from tests.support.mesh import LocalMesh

pytestmark = pytest.mark.integration

MODEL = "gemma3-270m"
WIDTH = 640  # gemma3-270m's embedding width
ANY_CODE = "*"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
         "def add(a, b): return a + b"]


def tokens_of(text: str) -> list[int]:
    """The text's tokens as the worker makes them (BOS first, special tokens parsed)."""
    import llama_cpp

    vocab = llama_cpp.Llama(str(materialize(MODEL)), vocab_only=True, verbose=False)
    return vocab.tokenize(text.encode(), add_bos=True, special=True)


def unit(vector: Sequence[float]) -> bool:
    return math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-4)


def close(a: Sequence[float], b: Sequence[float], tolerance: float = 1e-5) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b, strict=True)) < tolerance


def test_a_string(client: openai.OpenAI) -> None:
    r = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    assert r.object == "list" and r.model == MODEL and len(r.data) == 1
    item = r.data[0]
    assert item.object == "embedding" and item.index == 0
    assert len(item.embedding) == WIDTH and unit(item.embedding)
    assert r.usage.prompt_tokens == len(tokens_of(TEXTS[0])) == r.usage.total_tokens


def test_a_list_keeps_order_and_counts_every_token(client: openai.OpenAI) -> None:
    r = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert [d.index for d in r.data] == [0, 1, 2]
    assert all(len(d.embedding) == WIDTH and unit(d.embedding) for d in r.data)
    assert r.usage.prompt_tokens == sum(len(tokens_of(t)) for t in TEXTS)
    alone = client.embeddings.create(model=MODEL, input=TEXTS[1], encoding_format="float")
    # batched and alone run other kernel shapes in llama.cpp: equal up to rounding
    assert close(alone.data[0].embedding, r.data[1].embedding, 1e-2)


def test_token_arrays_embed_as_their_text(client: openai.OpenAI) -> None:
    text = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    one = client.embeddings.create(model=MODEL, input=tokens_of(TEXTS[0]),
                                   encoding_format="float")
    assert close(one.data[0].embedding, text.data[0].embedding)
    many = client.embeddings.create(model=MODEL, input=[tokens_of(t) for t in TEXTS],
                                    encoding_format="float")
    strings = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    for a, b in zip(many.data, strings.data, strict=True):
        assert close(a.embedding, b.embedding)


def test_base64_decodes_to_the_float_answer(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    default = client.embeddings.create(model=MODEL, input=TEXTS)  # the client asks base64
    assert [d.embedding for d in default.data] == [d.embedding for d in floats.data]
    raw = client.embeddings.with_raw_response.create(model=MODEL, input=TEXTS[0],
                                                     encoding_format="base64")
    assert isinstance(raw.http_response.json()["data"][0]["embedding"], str)


def test_the_same_input_gives_the_same_vector(client: openai.OpenAI) -> None:
    first = client.embeddings.create(model=MODEL, input=TEXTS[2], encoding_format="float")
    again = client.embeddings.create(model=MODEL, input=TEXTS[2], encoding_format="float")
    assert first.data[0].embedding == again.data[0].embedding


def test_dimensions_equal_to_the_width_are_accepted(client: openai.OpenAI) -> None:
    r = client.embeddings.create(model=MODEL, input="x", dimensions=WIDTH)
    assert len(r.data[0].embedding) == WIDTH


@pytest.mark.parametrize(("body", "status", "param", "code"), [
    ({"input": ""}, 400, "input", None),
    ({"input": []}, 400, "input", None),
    ({"input": ["a", ""]}, 400, "input", None),
    ({"input": [[]]}, 400, "input", None),
    ({"input": [2, 262144]}, 400, "input", None),  # outside gemma3's vocabulary
    ({"input": "word " * 600}, 400, "input", None),  # over one input's 512 tokens
    ({"input": ["x"] * 2049}, 400, "input", ANY_CODE),  # the gateway's input limits too
    ({"input": "x", "dimensions": 256}, 400, "dimensions", "unsupported_value"),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format", None),
    ({"input": "x", "model": "no-such-model"}, 404, "model", "model_not_found"),
], ids=["empty string", "empty list", "empty item", "empty tokens", "token outside vocab",
        "too long", "too many", "dimensions", "encoding", "unknown model"])
def test_bad_input_is_refused_in_openais_shape(mesh: LocalMesh, body: dict[str, object],
                                               status: int, param: str,
                                               code: str | None) -> None:
    r = httpx.post(mesh.base_url + "/v1/embeddings", json={"model": MODEL, **body},
                   timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert code in (ANY_CODE, error["code"]) and error["message"]


def test_the_official_client_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MODEL, input="x", dimensions=8)
    assert info.value.status_code == 400


def test_langchain_openai_embeddings(mesh: LocalMesh) -> None:
    from langchain_openai import OpenAIEmbeddings
    from pydantic import SecretStr

    # As LangChain's docs say for OpenAI-compatible servers: no tiktoken length check
    # (tiktoken would fetch its tables from the internet and count other tokens).
    embeddings = OpenAIEmbeddings(model=MODEL, base_url=mesh.base_url + "/v1",
                                  api_key=SecretStr("unused"),
                                  check_embedding_ctx_length=False)
    documents = embeddings.embed_documents(TEXTS)
    query = embeddings.embed_query(TEXTS[0])
    assert len(documents) == 3 and all(len(d) == WIDTH and unit(d) for d in documents)
    assert len(query) == WIDTH and unit(query)
