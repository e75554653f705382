"""The same request gives the same answer (issue 14), on the real model through the real
mesh: cold or warm prefix cache, streamed or not, alone or beside 1, 3 or 7 other requests,
greedy or seeded, and on either of two replicas, every token and its logprob identical."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import openai
import pytest
from meshllm.common.convert import event_from_pb, generate_request_to_pb
from meshllm.common.types import (
    ChatMessage,
    GenerateRequest,
    ModelId,
    RequestId,
    SamplingParams,
    TokenDelta,
)
from meshllm.v1 import worker_pb2, worker_pb2_grpc

from tests.support.mesh import LocalMesh, MeshOptions

pytestmark = pytest.mark.integration

MODEL = "gemma3-270m"
MAX_TOKENS = 24
PROMPTS = [
    "What is the capital of France?",
    "Tell me a short story about a village at the edge of a dark forest.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "List three colors and explain why each matters in painting.",
    "What is the meaning of life?",
    "At what temperature does water boil?",
    "Summarize the history of the Roman Empire in two sentences.",
    "What happened in 1492?",
    "What is the largest planet in the solar system?",
    "Translate to French: the weather is nice today.",
]
GREEDY = {"temperature": 0.0}
SEEDED = {"temperature": 0.9, "top_p": 0.95, "seed": 1234}
# A generated token and its logprob: equal logprobs mean equal logits, not only argmax.
Tokens = tuple[tuple[str, float], ...]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    mesh = LocalMesh(tmp_path_factory.mktemp("reproducible"), MeshOptions(workers=2))
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()


def client(mesh: LocalMesh) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=mesh.base_url + "/v1", api_key="x", max_retries=0,
                              timeout=120)


async def ask(api: openai.AsyncOpenAI, prompt: str, sampling: dict[str, float],
              stream: bool = False) -> Tokens:
    args = dict(model=MODEL, messages=[{"role": "user", "content": prompt}],
                max_tokens=MAX_TOKENS, logprobs=True, **sampling)
    if not stream:
        reply = await api.chat.completions.create(**args)  # type: ignore[call-overload]
        assert reply.choices[0].logprobs is not None
        return tuple((t.token, t.logprob) for t in reply.choices[0].logprobs.content)
    out: list[tuple[str, float]] = []
    async for chunk in await api.chat.completions.create(stream=True, **args):  # type: ignore[call-overload]
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            out += [(t.token, t.logprob) for t in chunk.choices[0].logprobs.content]
    return tuple(out)


async def batches(api: openai.AsyncOpenAI, size: int, sampling: dict[str, float]
                  ) -> list[Tokens]:
    """Every prompt once, sent `size` at a time beside other prompts."""
    got: dict[int, Tokens] = {}
    for start in range(0, len(PROMPTS), size):
        idx = [(start + j) % len(PROMPTS) for j in range(size)]
        replies = await asyncio.gather(*(ask(api, PROMPTS[i], sampling) for i in idx))
        for i, reply in zip(idx, replies, strict=True):
            got.setdefault(i, reply)
    return [got[i] for i in range(len(PROMPTS))]


def disagreements(reference: list[Tokens], got: list[Tokens]) -> list[str]:
    return [f"prompt {i}: {ref!r} != {other!r}"
            for i, (ref, other) in enumerate(zip(reference, got, strict=True)) if ref != other]


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_same_request_same_tokens(mesh: LocalMesh, sampling: dict[str, float]) -> None:
    async def run() -> dict[str, list[Tokens]]:
        api = client(mesh)
        runs = {"cold": [await ask(api, p, sampling) for p in PROMPTS]}
        runs["warm"] = [await ask(api, p, sampling) for p in PROMPTS]
        runs["streamed"] = [await ask(api, p, sampling, stream=True) for p in PROMPTS]
        for size in (2, 4, 8):
            runs[f"batch{size}"] = await batches(api, size, sampling)
        return runs

    runs = asyncio.run(run())
    assert all(runs["cold"]), "a reply without tokens"
    assert len({t for t in runs["cold"]}) == len(PROMPTS), "different prompts, same reply?"
    failures = {name: bad for name, got in runs.items()
                if (bad := disagreements(runs["cold"], got))}
    assert not failures, failures


def on_worker(port: int, prompt: str, sampling: SamplingParams) -> Tokens:
    request = GenerateRequest(RequestId(f"direct-{port}"), ModelId(MODEL),
                              chat=(ChatMessage("user", prompt),), sampling=sampling,
                              logprobs=0)
    out: list[tuple[str, float]] = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = worker_pb2_grpc.ShardWorkerStub(channel)
        for message in stub.Generate(generate_request_to_pb(request), timeout=120):
            event = event_from_pb(message)
            if isinstance(event, TokenDelta):
                out += [(t.token, t.logprob) for t in event.logprobs]
    return tuple(out)


def test_both_replicas_give_the_same_tokens(mesh: LocalMesh) -> None:
    ports = list(mesh.worker_ports.values())
    assert len(ports) == 2
    for sampling in (SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
                     SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.95,
                                    seed=1234)):
        for prompt in PROMPTS[:4]:
            first, second = (on_worker(port, prompt, sampling) for port in ports)
            assert len(first) == MAX_TOKENS
            assert first == second, (prompt, first, second)


def test_batch_request_counts_reached_both_replicas(mesh: LocalMesh) -> None:
    """The batches above spread over both replicas (least busy first), so they compared
    tokens computed on different workers too."""
    served = []
    for port in mesh.worker_ports.values():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stats = worker_pb2_grpc.ShardWorkerStub(channel).GetStats(
                worker_pb2.GetStatsRequest(), timeout=5)
        served.append(stats.generated_tokens_total)
    assert all(n > 0 for n in served), served
