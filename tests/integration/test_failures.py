"""Failures with real processes: a worker killed mid-stream leaves the mesh, an engine that
crashes is restarted, requests in parallel survive a worker's loss (streams that move on a
failure: test_migration.py)."""

from __future__ import annotations

import itertools
import signal
import subprocess
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import grpc
import openai
import pytest
from meshllm.v1 import worker_pb2, worker_pb2_grpc

from tests.support.mesh import LocalMesh, MeshOptions, wait_for

pytestmark = pytest.mark.integration

MODEL = "gemma3-270m"


@pytest.fixture
def failing_mesh(tmp_path: Path) -> Iterator[LocalMesh]:
    mesh = LocalMesh(tmp_path, MeshOptions(workers=2, lease_ttl_s=4, keepalive_s=1.0))
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()


def busy_worker(mesh: LocalMesh) -> str:
    for name, port in mesh.worker_ports.items():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stats = worker_pb2_grpc.ShardWorkerStub(channel).GetStats(
                worker_pb2.GetStatsRequest(), timeout=5)
        if stats.running_requests:
            return name
    raise AssertionError("no worker is running the request")


def engine_pid(worker_pid: int) -> int:
    """The worker's serving engine: the oldest (the one it keeps started ahead of the next
    load came after it)."""
    out = subprocess.run(["pgrep", "-o", "-P", str(worker_pid), "-f", "meshllm.worker.engine"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def long_stream(mesh: LocalMesh, max_tokens: int = 3000) -> Generator[str, None, None]:
    client = openai.OpenAI(base_url=mesh.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
    stream = client.completions.create(model=MODEL, prompt="Tell a very long story.",
                                       max_tokens=max_tokens, temperature=0, stream=True)
    for chunk in stream:
        yield chunk.choices[0].text if chunk.choices else ""


def test_a_killed_worker_leaves_the_status_within_its_lease(failing_mesh: LocalMesh) -> None:
    """Its stream moves to the other replica (test_migration.py has the details); the
    dead node leaves the status within the lease TTL (plus a refresh of slack)."""
    mesh = failing_mesh
    tokens = long_stream(mesh, max_tokens=48)
    assert next(tokens) is not None
    victim = busy_worker(mesh)
    killed_at = time.monotonic()
    mesh.procs[victim].kill(signal.SIGKILL)
    assert "".join(tokens)
    gone_s = wait_for(lambda: victim not in mesh.worker_ids_in_status(), 15, "node removal")
    print(f"node gone from status {time.monotonic() - killed_at:.1f}s after SIGKILL "
          f"(lease TTL {mesh.options.lease_ttl_s}s)")
    assert gone_s <= mesh.options.lease_ttl_s + 3


def test_engine_crash_is_reported_and_restarted(failing_mesh: LocalMesh) -> None:
    mesh = failing_mesh
    tokens = long_stream(mesh)
    assert next(tokens) is not None
    victim = busy_worker(mesh)
    engine = engine_pid(mesh.procs[victim].pid)
    subprocess.run(["kill", "-ABRT", str(engine)], check=True)  # as llama.cpp's abort() does
    assert "".join(itertools.islice(tokens, 16))  # the stream went on, on the other replica
    tokens.close()
    assert mesh.procs[victim].alive(), "the worker service must survive its engine"

    def restarted() -> bool:
        node = next(n for n in mesh.status()["nodes"] if n["worker_id"] == victim)
        state = node["models"][MODEL]
        return bool(state["engine_restarts"] == 1 and state["state"] == "ready")

    recovered_s = wait_for(restarted, 60, "engine restart")
    print(f"engine restarted and ready {recovered_s:.1f}s after the crash")
    assert engine_pid(mesh.procs[victim].pid) != engine


def test_requests_in_parallel_survive_one_worker_loss(failing_mesh: LocalMesh) -> None:
    """Requests that had not started on the dead worker are retried on the live one."""
    mesh = failing_mesh
    client = openai.OpenAI(base_url=mesh.base_url + "/v1", api_key="x", max_retries=0)
    mesh.procs["worker-1"].kill(signal.SIGKILL)
    results: list[str] = []

    def ask() -> None:
        r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0)
        results.append(r.choices[0].text)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 4
