"""Failures with real processes: a worker killed mid-stream, an engine that crashes."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
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
    out = subprocess.run(["pgrep", "-P", str(worker_pid), "-f", "meshllm.worker.engine"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def long_stream(mesh: LocalMesh) -> Iterator[str]:
    client = openai.OpenAI(base_url=mesh.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
    stream = client.completions.create(model=MODEL, prompt="Tell a very long story.",
                                       max_tokens=3000, temperature=0, stream=True)
    for chunk in stream:
        yield chunk.choices[0].text if chunk.choices else ""


def test_worker_killed_mid_stream(failing_mesh: LocalMesh) -> None:
    mesh = failing_mesh
    tokens = long_stream(mesh)
    assert next(tokens) is not None
    victim = busy_worker(mesh)
    killed_at = time.monotonic()
    mesh.procs[victim].kill(signal.SIGKILL)
    with pytest.raises(openai.APIError) as info:
        for _ in tokens:
            pass
    error_after_s = time.monotonic() - killed_at
    assert "after the stream began" in str(info.value) or victim in str(info.value)
    assert error_after_s < 5, f"the error event took {error_after_s:.1f}s"

    # the other replica keeps serving, right away
    client = openai.OpenAI(base_url=mesh.base_url + "/v1", api_key="x", max_retries=0)
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    assert r.choices[0].text

    # the dead node leaves the status within the lease TTL (plus a refresh of slack)
    gone_s = wait_for(lambda: victim not in mesh.worker_ids_in_status(), 15, "node removal")
    print(f"error event {error_after_s:.2f}s after SIGKILL; node gone from status after "
          f"{gone_s + error_after_s:.1f}s (lease TTL {mesh.options.lease_ttl_s}s)")
    assert gone_s + error_after_s <= mesh.options.lease_ttl_s + 3


@pytest.fixture
def freezing_mesh(tmp_path: Path) -> Iterator[LocalMesh]:
    mesh = LocalMesh(tmp_path, MeshOptions(
        workers=2, lease_ttl_s=4, keepalive_s=1.0,
        gateway_args=("--token-timeout-s", "3", "--first-token-timeout-s", "5")))
    try:
        mesh.start()
        yield mesh
    finally:
        for proc in mesh.procs.values():
            if proc.alive():
                proc.kill(signal.SIGCONT)  # a stopped process ignores the SIGTERM of stop()
        mesh.stop()


def test_a_worker_frozen_mid_stream_ends_it_with_an_error_not_a_hang(
        freezing_mesh: LocalMesh) -> None:
    """SIGSTOP (a node that hangs, its socket still open) is not a crash: nothing tells the
    gateway, so only its token timeout can end the stream."""
    mesh = freezing_mesh
    tokens = long_stream(mesh)
    assert next(tokens) is not None
    victim = busy_worker(mesh)
    frozen_at = time.monotonic()
    mesh.procs[victim].kill(signal.SIGSTOP)  # the worker and its engine: one process group
    with pytest.raises(openai.APIError) as info:
        for _ in tokens:
            pass
    error_after_s = time.monotonic() - frozen_at
    assert error_after_s < 3 + 5, f"the error event took {error_after_s:.1f}s"
    assert f"worker {victim} sent nothing for 3s" in str(info.value)
    # the next request is served by the live replica: the frozen one leaves with its lease
    client = openai.OpenAI(base_url=mesh.base_url + "/v1", api_key="x", max_retries=0,
                           timeout=60)
    started = time.monotonic()
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    assert r.choices[0].text
    print(f"error event {error_after_s:.2f}s after SIGSTOP (token timeout 3 s); next request "
          f"answered in {time.monotonic() - started:.1f}s")


def test_engine_crash_is_reported_and_restarted(failing_mesh: LocalMesh) -> None:
    mesh = failing_mesh
    tokens = long_stream(mesh)
    assert next(tokens) is not None
    victim = busy_worker(mesh)
    engine = engine_pid(mesh.procs[victim].pid)
    subprocess.run(["kill", "-ABRT", str(engine)], check=True)  # as llama.cpp's abort() does
    with pytest.raises(openai.APIError):
        for _ in tokens:
            pass
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
