"""Continuous batching through the real gateway: concurrency, prefix reuse, backpressure."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.support.mesh import LocalMesh, MeshOptions
from tests.support.procs import free_port

pytestmark = pytest.mark.integration

MODEL = "gemma3-270m"


@pytest.fixture(scope="module")
def small_queue_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """One worker with 2 slots and room for 1 waiting request."""
    mesh = LocalMesh(tmp_path_factory.mktemp("batch"), MeshOptions(
        workers=1, worker_memory="2GiB", planner_args=("--slots", "2"),
        worker_args=("--max-queue", "1")))
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()


def aclient(mesh: LocalMesh) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=mesh.base_url + "/v1", api_key="x", max_retries=0,
                              timeout=120)


async def test_busy_engine_answers_429_and_loses_nothing(small_queue_mesh: LocalMesh) -> None:
    client = aclient(small_queue_mesh)

    async def one(i: int) -> str:
        try:
            r = await client.completions.create(model=MODEL, prompt=f"Story {i}:",
                                                max_tokens=48, temperature=0)
            return "ok" if r.choices[0].finish_reason else "?"
        except openai.RateLimitError as exc:
            assert "busy" in str(exc) and "Retry" in str(exc)
            return "429"

    outcomes = await asyncio.gather(*(one(i) for i in range(6)))
    assert outcomes.count("ok") >= 3  # two slots and one queued place were always there
    assert "429" in outcomes
    # once the burst is over, the model serves again
    r = await client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert r.choices[0].text is not None


async def test_a_chat_that_goes_on_reuses_its_prefix(small_queue_mesh: LocalMesh) -> None:
    client = aclient(small_queue_mesh)
    history: list[Any] = [
        {"role": "system", "content": "You are a helpful assistant who answers briefly."},
        {"role": "user", "content": "Name a large city in France."}]
    first = await client.chat.completions.create(model=MODEL, messages=history,
                                                 max_tokens=12, temperature=0)
    history += [{"role": "assistant", "content": first.choices[0].message.content or ""},
                {"role": "user", "content": "And one in Italy?"}]
    second = await client.chat.completions.create(model=MODEL, messages=history,
                                                  max_tokens=12, temperature=0)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens or 0
    assert first.usage is not None
    assert cached >= first.usage.prompt_tokens  # the first turn's prompt and its reply
    print(f"second turn: {cached} of {second.usage.prompt_tokens} prompt tokens reused")


async def test_eight_concurrent_streams_complete(tmp_path_factory: pytest.TempPathFactory
                                                 ) -> None:
    mesh = LocalMesh(tmp_path_factory.mktemp("eight"), MeshOptions(
        workers=1, worker_memory="4GiB", planner_args=("--slots", "8")))
    mesh.start()
    try:
        client = aclient(mesh)

        async def stream(i: int) -> int:
            chunks = await client.completions.create(
                model=MODEL, prompt=f"List {i + 3} animals:", max_tokens=24, temperature=0,
                stream=True, stream_options={"include_usage": True})
            usage = 0
            async for chunk in chunks:
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
            return usage

        counts = await asyncio.gather(*(stream(i) for i in range(8)))
        assert all(0 < c <= 24 for c in counts)
        status = mesh.status()
        assert status["models"][0]["status"] == "serving"
    finally:
        mesh.stop()


async def test_ngram_speculation_is_exported(tmp_path_factory: pytest.TempPathFactory) -> None:
    metrics_port = free_port()
    mesh = LocalMesh(tmp_path_factory.mktemp("spec"), MeshOptions(
        workers=1, worker_memory="2GiB", planner_args=("--slots", "2", "--speculative", "ngram"),
        worker_args=("--metrics-port", str(metrics_port))))
    mesh.start()
    try:
        client = aclient(mesh)
        text = "one two three four five six seven eight nine ten. " * 6
        for _ in range(2):  # the engine reports once a second; the second call sees it
            r = await client.completions.create(model=MODEL, prompt=text, max_tokens=40,
                                                temperature=0)
            assert r.choices[0].text
            await asyncio.sleep(1.2)
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        per_step = [float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith('meshllm_worker_tokens_per_step{model="gemma3-270m"}')]
        accepted = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(
            'meshllm_worker_speculative_acceptance_ratio{model="gemma3-270m"}')]
        assert per_step and per_step[0] > 1.0, metrics
        assert accepted and 0 < accepted[0] <= 1
    finally:
        mesh.stop()
