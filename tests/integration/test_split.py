"""Pipeline parallelism with real processes: three workers, none of which can hold
gemma3-270m alone, serve it split by layers over ggml RPC tunnelled through gRPC."""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support.mesh import LocalMesh, MeshOptions, wait_for

pytestmark = pytest.mark.integration

MODEL = "gemma3-270m"
PROMPTS = ["The history of the printing press", "def fibonacci(n):",
           "Three facts about the moon:"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def solo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Greedy completions from the same model served whole by one worker."""
    mesh = LocalMesh(tmp_path_factory.mktemp("solo"), MeshOptions(workers=1,
                                                                 worker_memory="2GiB"))
    try:
        mesh.start()
        client = client_for(mesh)
        return {p: client.completions.create(model=MODEL, prompt=p, max_tokens=MAX_TOKENS,
                                             temperature=0).choices[0].text or ""
                for p in PROMPTS}
    finally:
        mesh.stop()


@pytest.fixture(scope="module")
def split_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    # 350 MiB each: with 4 slots of 4096 tokens the model needs about 490 MiB on one
    # worker (not even one slot fits 350 MiB whole), so it splits over two, and the third
    # is left for the re-plan after a stage dies (8 slots would need all three).
    mesh = LocalMesh(tmp_path_factory.mktemp("split"),
                     MeshOptions(workers=3, worker_memory="350MiB", lease_ttl_s=4,
                                 expect_replicas=1, planner_args=("--slots", "4")))
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()


def client_for(mesh: LocalMesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.base_url + "/v1", api_key="x", max_retries=0,
                         timeout=120)


def gemma(mesh: LocalMesh) -> dict[str, Any]:
    return next(m for m in mesh.status()["models"] if m["model_id"] == MODEL)


def test_status_reports_the_split(split_mesh: LocalMesh) -> None:
    model = gemma(split_mesh)
    assert model["status"] == "serving"
    (replica,) = model["replicas"]
    assert replica["split"] and len(replica["stages"]) >= 2
    layers = [tuple(s["layers"]) for s in replica["stages"]]
    assert layers[0][0] == 0 and layers[-1][1] == 18
    assert all(a[1] == b[0] for a, b in itertools.pairwise(layers))
    assert all(s["state"] == "ready" for s in replica["stages"])
    wait_for(lambda: all(v is not None for v in gemma(split_mesh)["replicas"][0]
                         ["link_rtt_ms"].values()), 20, "link round trips")


def test_split_equals_solo_token_for_token(split_mesh: LocalMesh, solo: dict[str, str]) -> None:
    client = client_for(split_mesh)
    for prompt in PROMPTS:
        whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                          temperature=0)
        assert whole.choices[0].text == solo[prompt]
        chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                           temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == solo[prompt]
    # ... with n-gram drafting on the split's head, speculation's default (`auto`) there
    loads = [line for proc in split_mesh.procs.values() if proc.name.startswith("worker")
             for line in proc.log_path.read_text(errors="replace").splitlines()
             if "meshllm.worker.engine: loaded" in line]
    assert loads and all(line.endswith("speculative decoding ngram") for line in loads), loads


def test_killing_a_stage_moves_the_stream_to_the_replanned_split(
        split_mesh: LocalMesh, solo: dict[str, str]) -> None:
    """The head's generation fails with its stage; the gateway holds the stream while the
    planner re-plans the split onto the spare worker, then the new split carries it on
    from the tokens already sent: the client gets the solo output, uninterrupted."""
    mesh = split_mesh
    replica = gemma(mesh)["replicas"][0]
    victim = replica["stages"][-1]["worker_id"]
    stream = client_for(mesh).completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stream=True)
    chunks = iter(stream)
    text = next(chunks).choices[0].text
    killed = time.monotonic()
    mesh.procs[victim].kill(signal.SIGKILL)
    pieces = [c.choices[0].text for c in chunks if c.choices]
    resumed_s = time.monotonic() - killed
    assert text + "".join(pieces) == solo[PROMPTS[0]]
    model = gemma(mesh)
    assert all(victim not in [s["worker_id"] for s in r["stages"]] for r in model["replicas"])
    print(f"stage killed: the stream finished on the re-planned split {resumed_s:.1f}s later "
          f"(lease TTL {mesh.options.lease_ttl_s}s), identical to solo")


def test_direct_transport_and_forced_split(tmp_path: Path, solo: dict[str, str]) -> None:
    """Two workers that could each hold the model, told to split it, over direct RPC with
    llama-cpp-python's own ggml-rpc library (the other tests use mesh-llm's)."""
    mesh = LocalMesh(tmp_path, MeshOptions(
        workers=2, worker_memory="1GiB", expect_replicas=1, planner_args=("--split", MODEL),
        worker_args=("--rpc-transport", "direct", "--rpc-library", "stock")))
    try:
        mesh.start()
        (replica,) = gemma(mesh)["replicas"]
        assert [s["worker_id"] for s in replica["stages"]] == ["worker-1", "worker-2"]
        r = client_for(mesh).completions.create(model=MODEL, prompt=PROMPTS[1],
                                                max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == solo[PROMPTS[1]]
    finally:
        mesh.stop()
