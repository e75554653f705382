"""Prefix affinity with real processes: a multi-turn chat over two replicas returns, every
turn, to the replica that holds its prefix, and that replica reuses its KV cache.

The first turn is sent while the other replica is busy with a long stream, so it lands on
the replica that ties on id would not pick; the later turns are sent with both idle, where
load and id alone would send them elsewhere. Which replica served a turn is read from the
workers' own prompt-token counters."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
from meshllm.v1 import worker_pb2, worker_pb2_grpc
from openai.types.chat import ChatCompletionMessageParam

from tests.support.mesh import LocalMesh, MeshOptions, wait_for

pytestmark = pytest.mark.integration

MODEL = "gemma3-270m"
TURNS = 5
SYSTEM = ("You are a patient guide to the history of navigation. Answer in short plain "
          "sentences and keep to the facts a museum placard would state.")


@pytest.fixture
def two_replicas(tmp_path: Path) -> Iterator[LocalMesh]:
    mesh = LocalMesh(tmp_path, MeshOptions(workers=2))
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()


def worker_stats(mesh: LocalMesh) -> dict[str, worker_pb2.WorkerStats]:
    stats = {}
    for name, port in mesh.worker_ports.items():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stats[name] = worker_pb2_grpc.ShardWorkerStub(channel).GetStats(
                worker_pb2.GetStatsRequest(), timeout=5)
    return stats


def served_by(before: dict[str, worker_pb2.WorkerStats],
              after: dict[str, worker_pb2.WorkerStats]) -> list[str]:
    return [name for name in after
            if after[name].prompt_tokens_total > before[name].prompt_tokens_total]


def running_in_status(mesh: LocalMesh, name: str) -> int:
    node = next(n for n in mesh.status()["nodes"] if n["worker_id"] == name)
    return int(node["models"][MODEL]["running"])


class Background:
    """A long stream that keeps one replica busy until `stop()`."""

    def __init__(self, client: openai.OpenAI) -> None:
        self._stop = threading.Event()
        self._client = client
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        stream = self._client.completions.create(
            model=MODEL, prompt="Tell a very long story.", max_tokens=3000, temperature=0,
            stream=True)
        with stream:
            for _ in stream:
                if self._stop.is_set():
                    return

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(30)


def busy_worker(mesh: LocalMesh) -> str:
    busy = [n for n, s in worker_stats(mesh).items() if s.running_requests]
    assert len(busy) == 1, busy
    return busy[0]


def test_a_conversation_returns_to_the_replica_that_caches_it(two_replicas: LocalMesh) -> None:
    mesh = two_replicas
    client = openai.OpenAI(base_url=mesh.base_url + "/v1", api_key="x", max_retries=0,
                           timeout=120)
    background = Background(client)
    wait_for(lambda: any(s.running_requests for s in worker_stats(mesh).values()), 60,
             "the background stream")
    busy = busy_worker(mesh)
    messages: list[ChatCompletionMessageParam] = [{"role": "system", "content": SYSTEM}]
    served, cached = [], []
    for turn in range(TURNS):
        messages.append({"role": "user", "content": f"Question {turn + 1}: what did sailors "
                                                    f"use to find their way, part {turn + 1}?"})
        before = worker_stats(mesh)
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                               temperature=0)
        served.append(served_by(before, worker_stats(mesh)))
        assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
        cached.append(reply.usage.prompt_tokens_details.cached_tokens or 0)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
        if turn == 0:  # from now on both replicas are idle: load alone would not decide
            background.stop()
            wait_for(lambda: running_in_status(mesh, busy) == 0, 30, "the busy one idle")
    print(f"busy replica {busy}; turns served by {served}; cached tokens {cached}")
    home = served[0]
    assert home != [busy], "the first turn should avoid the busy replica"
    assert served == [home] * TURNS
    assert all(c > 0 for c in cached[1:]), cached
