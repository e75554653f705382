"""Models declared at run time on a real mesh: `/api/models`, `/v1/models`, the cold-start
wait, removal, a restarted planner, and `mesh-llm models` through the installed executable."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from meshllm.common.meshview import MeshSnapshot, read_mesh
from meshllm.common.models import materialize
from meshllm.common.store import EtcdStore
from meshllm.common.types import ModelId
from meshllm.v1 import planner_pb2, planner_pb2_grpc

from tests.support.mesh import LocalMesh, MeshOptions, get_json, wait_for
from tests.support.procs import Proc, python_module

pytestmark = pytest.mark.integration

MESH_LLM = str(Path(sys.executable).parent / "mesh-llm")  # the venv's console script
BASE = "gemma3-270m"
COPY = "gemma-copy"
OPTIONS = MeshOptions(workers=1, models=(BASE,), context_length=1024)  # both fit one worker
MESSAGES: Any = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    local = LocalMesh(tmp_path_factory.mktemp("models-mesh"), OPTIONS)
    try:
        local.start()
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def copies(mesh: LocalMesh) -> Path:
    """A second and a third GGUF: the gemma3 file under other names."""
    folder = mesh.root / "tmp"
    folder.mkdir(exist_ok=True)
    for name in (COPY, "gemma-cli"):
        shutil.copyfile(materialize(BASE), folder / f"{name}.gguf")
    return folder


def call(mesh: LocalMesh, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(mesh.base_url + path, data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def declared(mesh: LocalMesh) -> dict[str, dict[str, Any]]:
    return {d["id"]: d for d in get_json(mesh.base_url + "/api/models")["data"]}


def listed(mesh: LocalMesh) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in get_json(mesh.base_url + "/v1/models")["data"]}


def read_etcd(mesh: LocalMesh) -> MeshSnapshot:
    async def read() -> MeshSnapshot:
        kv = EtcdStore(mesh.etcd_url)
        await kv.connect()
        try:
            return await read_mesh(kv)
        finally:
            await kv.close()
    return asyncio.run(read())


def planned(mesh: LocalMesh) -> set[str]:
    """The models in the planner's own placement set (empty until it has planned)."""
    with grpc.insecure_channel(f"127.0.0.1:{mesh.planner_port}") as channel:
        try:
            placements = planner_pb2_grpc.PlannerStub(channel).GetPlacements(
                planner_pb2.GetPlacementsRequest(), timeout=2)
        except grpc.RpcError:
            return set()
    return {p.model_id for p in placements.placements}


def openai_client(mesh: LocalMesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.base_url + "/v1", api_key="unused", max_retries=0,
                         timeout=300)


def test_models_given_at_start_are_declared(mesh: LocalMesh) -> None:
    base = declared(mesh)[BASE]
    assert base["model"] == BASE and base["state"] == "serving"
    assert (base["min_replicas"], base["max_replicas"], base["priority"]) == (0, 0, 0)
    assert base["at_start"] is True
    assert listed(mesh)[BASE]["status"] == "serving"


def test_a_model_added_at_run_time_waits_then_answers(mesh: LocalMesh, copies: Path) -> None:
    """The request sent right after declaring waits while the model loads (cold start)."""
    path = str(copies / f"{COPY}.gguf")
    started = time.monotonic()
    status, made = call(mesh, "POST", "/api/models", {"model": path, "max_replicas": 1})
    assert status == 201, made
    assert made["id"] == COPY and made["model"] == path and made["state"] == "waiting"
    reply = openai_client(mesh).chat.completions.create(model=COPY, messages=MESSAGES,
                                                        max_tokens=8, temperature=0)
    waited = time.monotonic() - started
    assert reply.choices[0].message.content and reply.model == COPY
    print(f"\ncold start: declared to first answer in {waited:.1f} s")
    assert declared(mesh)[COPY]["state"] == "serving"
    model = openai_client(mesh).models.retrieve(COPY)
    assert model.model_dump()["status"] == "serving"
    assert {BASE, COPY} <= set(listed(mesh))


def test_declaring_a_model_twice_conflicts(mesh: LocalMesh, copies: Path) -> None:
    status, body = call(mesh, "POST", "/api/models", {"model": str(copies / f"{COPY}.gguf")})
    assert status == 409 and body["error"]["code"] == "model_already_declared"
    status, body = call(mesh, "POST", "/api/models", {"model": BASE, "max_replicas": -1})
    assert status == 400 and body["error"]["param"] == "max_replicas"


def test_a_model_that_cannot_be_read_is_not_served_with_its_reason(mesh: LocalMesh) -> None:
    status, _ = call(mesh, "POST", "/api/models", {"model": "/nowhere/missing.gguf"})
    assert status == 201
    wait_for(lambda: declared(mesh)["missing"]["state"] == "not_served", 30, "not_served")
    assert "neither a known name" in declared(mesh)["missing"]["reason"]
    with pytest.raises(openai.APIStatusError) as err:  # no cold-start wait: 503 at once
        openai_client(mesh).chat.completions.create(model="missing", messages=MESSAGES)
    assert err.value.status_code == 503
    assert call(mesh, "DELETE", "/api/models/missing")[0] == 200
    assert mesh.procs["planner"].alive()


def test_a_restarted_planner_keeps_the_models_declared_at_run_time(mesh: LocalMesh) -> None:
    mesh.procs["planner"].stop()
    mesh.procs["planner"] = Proc("planner", python_module(
        "meshllm.planner", "--etcd", mesh.etcd_url, "--listen",
        f"127.0.0.1:{mesh.planner_port}", "--models", BASE, "--context-length", "1024"),
        mesh.root / "logs")
    wait_for(lambda: planned(mesh), 60, "the restarted planner's first plan")
    assert set(planned(mesh)) == {BASE, COPY}  # what it plans: what etcd declares
    assert set(declared(mesh)) == {BASE, COPY}
    assert all(d["state"] == "serving" for d in declared(mesh).values())
    assert read_etcd(mesh).placements[ModelId(COPY)].replicas  # kept where it was: no reload


def test_a_removed_model_disappears_and_loses_its_placement(mesh: LocalMesh) -> None:
    status, body = call(mesh, "DELETE", f"/api/models/{COPY}")
    assert status == 200 and body["deleted"] is True
    wait_for(lambda: COPY not in listed(mesh), 30, f"{COPY} gone from /v1/models")
    assert COPY not in declared(mesh)
    snapshot = read_etcd(mesh)
    assert COPY not in snapshot.placements and COPY not in snapshot.models
    wait_for(lambda: all(COPY not in n.get("models", {}) for n in mesh.status()["nodes"]),
             60, f"workers unload {COPY}")
    with pytest.raises(openai.NotFoundError):
        openai_client(mesh).chat.completions.create(model=COPY, messages=MESSAGES)
    assert call(mesh, "DELETE", f"/api/models/{COPY}")[0] == 404
    assert listed(mesh)[BASE]["status"] == "serving"


def mesh_llm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MESH_LLM, "models", *args], capture_output=True, text=True,
                          timeout=60)


def test_the_models_command(mesh: LocalMesh, copies: Path) -> None:
    url = ("--url", mesh.base_url + "/v1")  # with /v1, as `mesh-llm chat` takes it
    added = mesh_llm("add", str(copies / "gemma-cli.gguf"), "--max-replicas", "1", *url)
    assert added.returncode == 0, added.stderr
    assert "declared gemma-cli" in added.stdout

    def serving() -> bool:
        out = mesh_llm("ls", *url)
        return any(line.split()[:2] == ["gemma-cli", "serving"] for line in out.stdout.splitlines())

    took = wait_for(serving, 120, "gemma-cli serving")
    print(f"\nadded model serving after {took:.1f} s")
    as_json = json.loads(mesh_llm("ls", "--json", *url).stdout)
    assert {d["id"] for d in as_json["data"]} == {BASE, "gemma-cli"}
    again = mesh_llm("add", str(copies / "gemma-cli.gguf"), *url)
    assert again.returncode == 1 and "409" in again.stderr
    assert mesh_llm("rm", "gemma-cli", *url).returncode == 0
    assert "gemma-cli" not in mesh_llm("ls", *url).stdout
    missing = mesh_llm("rm", "gemma-cli", *url)
    assert missing.returncode == 1 and "404" in missing.stderr
