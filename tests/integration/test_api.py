"""The OpenAI API through the real gateway, planner, workers (llama.cpp) and etcd."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from typing import Any

import grpc
import httpx
import openai
import pytest
from meshllm.v1 import worker_pb2, worker_pb2_grpc

from tests.support.mesh import LocalMesh, wait_for

pytestmark = pytest.mark.integration

MODEL = "gemma3-270m"
MESSAGES: Any = [{"role": "user", "content": "Name three colours of the rainbow."}]
PROMPT = "The three primary colours are"


def test_models_lists_short_ids(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list().data}
    assert ids == {MODEL, "huge-test"}


def test_one_model_by_id(client: openai.OpenAI) -> None:
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model" and model.owned_by == "mesh-llm"
    extra = model.model_dump()
    assert extra["context_length"] > 0
    assert extra["capabilities"] == ["generation", "embeddings"]  # held whole: mean pooling
    assert extra == next(m for m in client.models.list().model_dump()["data"]
                         if m["id"] == MODEL)
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.status_code == 404
    body = err.value.response.json()["error"]
    assert body["code"] == "model_not_found" and body["param"] == "model"
    assert MODEL in body["message"]  # it lists the models served


def test_chat_completion(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16,
                                       temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.prompt_tokens > 5
    assert 0 < r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def _stream_chat(client: openai.OpenAI, **kwargs: Any) -> tuple[str, list[Any]]:
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                                 **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_streaming_chat_equals_non_streaming(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24,
                                           temperature=0)
    text, chunks = _stream_chat(client, max_tokens=24, temperature=0)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason


def test_streaming_completion_equals_non_streaming(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert whole.object == "text_completion"


def test_usage_in_final_chunk(client: openai.OpenAI) -> None:
    _, chunks = _stream_chat(client, max_tokens=8, temperature=0,
                             stream_options={"include_usage": True})
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_length_finish(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 5


def test_stop_sequence_cuts_the_text(client: openai.OpenAI) -> None:
    free = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0)
    text = free.choices[0].text
    words = text.split()
    assert len(words) > 4, text
    stop = words[3]
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30,
                                              temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_same_seed_same_sample(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24,
                                      temperature=1.0, seed=seed)
        return r.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert len({sample(s) for s in (1, 2, 3)} | {first}) > 1  # sampling is really random


def test_malformed_json_is_400(mesh: LocalMesh) -> None:
    r = httpx.post(mesh.base_url + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_invalid_field_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=7)
    assert "temperature" in str(info.value)


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert "gpt-9" in str(info.value) and MODEL in str(info.value)


def test_prompt_longer_than_context_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hello " * 5000, max_tokens=4)
    assert "maximum context length is 4096" in str(info.value)
    body: Any = info.value.body
    assert body["code"] == "context_length_exceeded"
    assert info.value.status_code == 400 and body["param"] == "messages"


def test_chat_longer_than_context_is_400_naming_messages(client: openai.OpenAI) -> None:
    """The worker's PromptTooLong reaches the client by its reason code, not its text."""
    long_chat: Any = [{"role": "user", "content": "hello " * 5000}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=long_chat, max_tokens=4)
    body: Any = info.value.body
    assert info.value.status_code == 400
    assert (body["type"], body["param"], body["code"]) == (
        "invalid_request_error", "messages", "context_length_exceeded")
    assert "maximum context length is 4096 tokens, but the prompt is" in body["message"]


def test_model_that_fits_nowhere_is_503_with_reason(client: openai.OpenAI,
                                                    mesh: LocalMesh) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="huge-test", messages=MESSAGES, stream=True)
    assert info.value.status_code == 503
    assert "largest worker budget is 1.0 GiB" in str(info.value)
    huge = next(m for m in mesh.status()["models"] if m["model_id"] == "huge-test")
    assert huge["status"].startswith("not served")


async def test_six_concurrent_streams(aclient: openai.AsyncOpenAI) -> None:
    async def one(i: int) -> tuple[str, str | None]:
        stream = await aclient.chat.completions.create(
            model=MODEL, max_tokens=12, temperature=0, stream=True,
            messages=[{"role": "user", "content": f"Count from {i} to {i + 5}."}])
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    results = await asyncio.gather(*(one(i) for i in range(6)))
    assert all(text and finish in ("stop", "length") for text, finish in results)


def _running_requests(mesh: LocalMesh) -> int:
    total = 0
    for port in mesh.worker_ports.values():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stats = worker_pb2_grpc.ShardWorkerStub(channel).GetStats(
                worker_pb2.GetStatsRequest(), timeout=5)
            total += stats.running_requests + stats.queued_requests
    return total


def test_client_disconnect_frees_the_slot(mesh: LocalMesh) -> None:
    body = {"model": MODEL, "prompt": "Write a long story.", "max_tokens": 3000,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", mesh.base_url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert _running_requests(mesh) == 1
    freed_after = wait_for(lambda: _running_requests(mesh) == 0, 10, "the slot to be freed")
    assert freed_after < 10


def test_status_endpoints_and_metrics(mesh: LocalMesh) -> None:
    status = mesh.status()
    assert {n["worker_id"] for n in status["nodes"]} == {"worker-1", "worker-2"}
    gemma = next(m for m in status["models"] if m["model_id"] == MODEL)
    assert gemma["ready_replicas"] == 2 and gemma["status"] == "serving"
    assert httpx.get(mesh.base_url + "/health").json()["status"] == "ok"
    metrics = httpx.get(mesh.base_url + "/metrics").text
    assert 'meshllm_gateway_requests_total{model="gemma3-270m",outcome="ok"}' in metrics
    assert "meshllm_gateway_time_to_first_token_seconds_bucket" in metrics


def test_mesh_llm_status_command(mesh: LocalMesh) -> None:
    out = subprocess.run([sys.executable, "-m", "meshllm.cli.main", "status", "--etcd",
                          mesh.etcd_url], capture_output=True, text=True, timeout=60, check=True)
    assert "worker-1" in out.stdout and "worker-2" in out.stdout
    assert "gemma3-270m" in out.stdout and "serving" in out.stdout
    assert "not served" in out.stdout  # the huge model, with its reason
    as_json = subprocess.run([sys.executable, "-m", "meshllm.cli.main", "status", "--etcd",
                              mesh.etcd_url, "--json"], capture_output=True, text=True,
                             timeout=60, check=True)
    assert len(json.loads(as_json.stdout)["nodes"]) == 2


def test_unknown_path_is_404_in_openai_shape(mesh: LocalMesh) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(mesh.base_url + "/v1/nothing", timeout=5)
    assert info.value.code == 404
    assert json.load(info.value)["error"]["code"] == "not_found"
