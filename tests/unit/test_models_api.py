"""`/api/models` and `/v1/models` over declarations, the model states, and the cold-start wait."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any, cast

import pytest
from meshllm.cli.models_cmd import gateway_url, table
from meshllm.common import convert, store
from meshllm.common.meshview import MeshSnapshot
from meshllm.common.store import KeyValueStore
from meshllm.common.types import (
    LoadState,
    ModelDeclaration,
    ModelId,
    ModelSpec,
    ModelState,
    Placement,
    WorkerId,
    WorkerInfo,
    whole,
)
from meshllm.gateway.app import Api, build_app
from meshllm.gateway.auth import KeyRing, plain_keys
from meshllm.gateway.backend import MeshBackend
from meshllm.gateway.cold_start import wait_for_replicas
from meshllm.gateway.config import StreamTiming
from meshllm.gateway.errors import ApiError
from meshllm.gateway.failures import NoLiveWorker
from meshllm.gateway.gate import Gate, front_door
from meshllm.gateway.limits import InputLimits
from meshllm.gateway.metrics import GatewayMetrics
from meshllm.gateway.models_api import ModelsApi, models_routes, parse_declaration
from meshllm.gateway.routing import Serving, serving_state
from starlette.testclient import TestClient

from tests.support.memory_kv import MemoryKv

M = ModelId("m")
DECLARED = ModelDeclaration(M, "/models/m.gguf")
SPEC = ModelSpec(M, "/models/m.gguf", 1, 1, 4096, 1, "x", 4096)


def worker(name: str, state: LoadState | None, error: str = "") -> WorkerInfo:
    states = (ModelState(M, state, error),) if state else ()
    return WorkerInfo(WorkerId(name), "127.0.0.1:1", "cpu", 1, 1, 0.0, states)


def snapshot(placement: Placement | None, *workers: WorkerInfo,
             spec: ModelSpec | None = SPEC) -> MeshSnapshot:
    return MeshSnapshot({w.worker_id: w for w in workers}, {M: spec} if spec else {},
                        {M: placement} if placement else {}, {M: DECLARED})


def placed(*hosts: str) -> Placement:
    return Placement(M, tuple(whole(WorkerId(h), 1) for h in hosts), 1)


PARSED = [
    ({"model": "gemma3-270m"}, ModelDeclaration(ModelId("gemma3-270m"), "gemma3-270m")),
    ({"model": " /tmp/Gemma Copy.gguf ", "min_replicas": 1, "max_replicas": 2, "priority": -5},
     ModelDeclaration(ModelId("gemma-copy"), "/tmp/Gemma Copy.gguf", 1, 2, -5)),
    ({"model": "x.gguf", "min_replicas": 3}, ModelDeclaration(ModelId("x"), "x.gguf", 3, 0)),
]


@pytest.mark.parametrize(("body", "declaration"), PARSED)
def test_parse_declaration(body: dict[str, Any], declaration: ModelDeclaration) -> None:
    assert parse_declaration(body) == declaration


REFUSED = [
    ({}, "model"),
    ({"model": ""}, "model"),
    ({"model": 3}, "model"),
    ({"model": "x" * 5000}, "model"),
    ({"model": "///"}, "model"),  # no file name: no id
    ({"model": "m", "min_replicas": -1}, "min_replicas"),
    ({"model": "m", "max_replicas": "2"}, "max_replicas"),
    ({"model": "m", "max_replicas": True}, "max_replicas"),
    ({"model": "m", "min_replicas": 3, "max_replicas": 2}, "min_replicas"),
    ({"model": "m", "priority": 1.5}, "priority"),
    ({"model": "m", "replicas": 2}, "replicas"),
]


@pytest.mark.parametrize(("body", "param"), REFUSED)
def test_parse_declaration_refuses(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_declaration(body)
    assert err.value.status == 400 and err.value.param == param


STATES = [
    ("not placed yet", snapshot(None), Serving.WAITING, "waits to be placed"),
    ("not described yet", snapshot(None, spec=None), Serving.WAITING, "waits to be placed"),
    ("fits nowhere", snapshot(Placement(M, (), 1, "needs 9 GiB")), Serving.NOT_SERVED,
     "needs 9 GiB"),
    ("placed, worker not reporting yet", snapshot(placed("w1")), Serving.LOADING,
     "w1: not reporting"),
    ("loading", snapshot(placed("w1"), worker("w1", LoadState.LOADING)), Serving.LOADING,
     "w1: loading"),
    ("one ready of two", snapshot(placed("w1", "w2"), worker("w1", LoadState.LOADING),
                                  worker("w2", LoadState.READY)), Serving.SERVING, ""),
    ("every replica failed", snapshot(placed("w1"), worker("w1", LoadState.FAILED, "oom")),
     Serving.NOT_SERVED, "w1: failed (oom)"),
    ("one failed, one loading", snapshot(placed("w1", "w2"), worker("w1", LoadState.FAILED),
                                         worker("w2", LoadState.LOADING)),
     Serving.LOADING, "w2: loading"),
]


@pytest.mark.parametrize(("mesh", "state", "reason"), [s[1:] for s in STATES],
                         ids=[s[0] for s in STATES])
def test_serving_state(mesh: MeshSnapshot, state: Serving, reason: str) -> None:
    found, why = serving_state(mesh, M)
    assert found is state
    assert reason in why if reason else why == ""


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_wait_returns_ready_replicas_at_once() -> None:
    async def never(timeout_s: float) -> None:
        raise AssertionError("no wait when a replica is ready")

    assert await wait_for_replicas(lambda: ["w1"], lambda: Serving.SERVING, never, 120.0) == [
        "w1"]


async def test_wait_follows_changes_until_a_replica_is_ready() -> None:
    clock, waits = FakeClock(), []
    ready: list[str] = []

    async def change(timeout_s: float) -> None:  # the mesh changes every 10 s
        waits.append(timeout_s)
        clock.now += 10
        if clock.now >= 130:
            ready.append("w1")

    found = await wait_for_replicas(lambda: list(ready), lambda: Serving.LOADING, change,
                                    120.0, clock)
    assert found == ["w1"] and waits == [120.0, 110.0, 100.0]


async def test_wait_gives_up_after_its_bound() -> None:
    clock, waits = FakeClock(), []

    async def timeout(timeout_s: float) -> None:  # nothing changes: each wait times out
        waits.append(timeout_s)
        clock.now += timeout_s

    assert await wait_for_replicas(list, lambda: Serving.WAITING, timeout, 120.0, clock) == []
    assert waits == [120.0]


@pytest.mark.parametrize("state", [Serving.NOT_SERVED, Serving.SERVING])
async def test_no_wait_when_no_replica_is_coming(state: Serving) -> None:
    async def never(timeout_s: float) -> None:
        raise AssertionError("no wait for a model that cannot be served")

    assert await wait_for_replicas(list, lambda: state, never, 120.0) == []


async def test_no_wait_when_the_bound_is_zero() -> None:
    async def never(timeout_s: float) -> None:
        raise AssertionError("no wait")

    assert await wait_for_replicas(list, lambda: Serving.LOADING, never, 0.0) == []


def backend(mesh: MeshSnapshot, cold_start_wait_s: float = 0.0) -> MeshBackend:
    b = MeshBackend(cast(KeyValueStore, object()),
                    StreamTiming(1.0, 1.0, cold_start_wait_s=cold_start_wait_s))
    b.snapshot = mesh
    return b


async def test_backend_waits_for_a_loading_model_then_routes_to_it() -> None:
    b = backend(snapshot(placed("w1"), worker("w1", LoadState.LOADING)), cold_start_wait_s=30)
    waiting = asyncio.create_task(b._candidates(M))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    b.snapshot = snapshot(placed("w1"), worker("w1", LoadState.READY))
    b._mesh_changed.set()  # what follow() does at each new snapshot
    assert [w.worker_id for w in await asyncio.wait_for(waiting, 5)] == ["w1"]


async def test_backend_gives_up_after_the_wait_with_the_reason() -> None:
    b = backend(snapshot(placed("w1"), worker("w1", LoadState.LOADING)), cold_start_wait_s=0.2)
    started = asyncio.get_running_loop().time()
    with pytest.raises(NoLiveWorker, match="w1: loading"):
        await b._candidates(M)
    assert 0.2 <= asyncio.get_running_loop().time() - started < 2


async def test_backend_answers_at_once_for_a_model_that_cannot_be_served() -> None:
    b = backend(snapshot(Placement(M, (), 1, "needs 9 GiB")), cold_start_wait_s=60)
    with pytest.raises(NoLiveWorker, match="needs 9 GiB"):
        await asyncio.wait_for(b._candidates(M), 2)


def client(mesh: MeshSnapshot, kv: MemoryKv, keys: tuple[str, ...] = ()) -> TestClient:
    b = backend(mesh)
    app = build_app(Api(b, GatewayMetrics()),
                    models_routes(ModelsApi(cast(KeyValueStore, kv), b, snapshot_wait_s=0)))
    return TestClient(front_door(app, Gate(KeyRing(plain_keys(keys)), InputLimits()), ()))


def test_post_declares_and_a_second_post_conflicts() -> None:
    kv = MemoryKv()
    http = client(MeshSnapshot(), kv)
    made = http.post("/api/models", json={"model": "/tmp/gemma-copy.gguf", "max_replicas": 1})
    assert made.status_code == 201
    assert made.json() == {"id": "gemma-copy", "object": "model_declaration",
                           "model": "/tmp/gemma-copy.gguf", "min_replicas": 0,
                           "max_replicas": 1, "priority": 0, "at_start": False,
                           "state": "waiting",
                           "reason": "model gemma-copy is declared and waits to be placed",
                           "replicas": 0, "ready_replicas": 0}
    assert convert.parse_declaration(kv.values[store.DECLARATIONS + "gemma-copy"]) == (
        ModelDeclaration(ModelId("gemma-copy"), "/tmp/gemma-copy.gguf", 0, 1))
    again = http.post("/api/models", json={"model": "/elsewhere/gemma-copy.gguf"})
    assert again.status_code == 409
    error = again.json()["error"]
    assert error["code"] == "model_already_declared" and error["param"] == "model"
    assert error["type"] == "invalid_request_error" and "gemma-copy" in error["message"]


def test_post_refuses_a_bad_body_in_the_openai_shape() -> None:
    http = client(MeshSnapshot(), MemoryKv())
    refused = http.post("/api/models", json={"model": "m", "priority": "high"})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "priority"
    assert http.post("/api/models", content=b"{not json").status_code == 400


def test_delete_removes_a_declaration_and_404s_an_unknown_one() -> None:
    kv = MemoryKv()
    kv.values[store.DECLARATIONS + "m"] = convert.declaration_to_pb(DECLARED).SerializeToString()
    kv.values[store.DECLARATIONS + "m2"] = b"another model"
    http = client(snapshot(None), kv)
    gone = http.delete("/api/models/m")
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert list(kv.values) == [store.DECLARATIONS + "m2"]
    unknown = http.delete("/api/models/m")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"


def test_get_lists_declarations_with_their_state() -> None:
    mesh = snapshot(placed("w1"), worker("w1", LoadState.READY))
    listed = client(mesh, MemoryKv()).get("/api/models").json()
    assert [(d["id"], d["state"], d["ready_replicas"]) for d in listed["data"]] == [
        ("m", "serving", 1)]


def test_v1_models_lists_declared_models_with_their_status() -> None:
    http = client(snapshot(None, spec=None), MemoryKv())
    data = http.get("/v1/models").json()["data"]
    assert data == [{"id": "m", "object": "model", "created": 0, "owned_by": "mesh-llm",
                     "capabilities": ["generation"], "ready_replicas": 0,
                     "status": "waiting",
                     "status_reason": "model m is declared and waits to be placed"}]
    assert http.get("/v1/models/m").json() == data[0]
    serving = client(snapshot(placed("w1"), worker("w1", LoadState.READY)), MemoryKv())
    model = serving.get("/v1/models/m").json()
    assert model["status"] == "serving" and model["context_length"] == 4096
    assert "status_reason" not in model


@pytest.mark.parametrize(("method", "path"), [("GET", "/api/models"), ("POST", "/api/models"),
                                              ("DELETE", "/api/models/m")])
def test_models_api_is_behind_the_api_key(method: str, path: str) -> None:
    kv = MemoryKv()
    http = client(snapshot(None), kv, keys=("secret-key-0123456789",))
    body = {"model": "x.gguf"} if method == "POST" else None
    assert http.request(method, path, json=body).status_code == 401
    allowed = http.request(method, path, json=body,
                           headers={"Authorization": "Bearer secret-key-0123456789"})
    assert allowed.status_code in (200, 201, 404)


async def test_backend_wait_until_sees_the_next_snapshot_or_gives_up() -> None:
    b = backend(MeshSnapshot())
    seen = asyncio.create_task(b.wait_until(lambda s: M in s.declarations, 5))
    await asyncio.sleep(0.05)
    b.snapshot = snapshot(None)
    b._mesh_changed.set()
    assert await seen
    assert not await b.wait_until(lambda s: not s.declarations, 0.05)


def test_models_ls_table_shows_the_reason_under_a_model_not_served() -> None:
    rows = [{"id": "gemma3-270m", "state": "serving", "ready_replicas": 2, "replicas": 2,
             "min_replicas": 0, "max_replicas": 0, "priority": 0, "model": "gemma3-270m",
             "reason": ""},
            {"id": "big", "state": "not_served", "ready_replicas": 0, "replicas": 0,
             "min_replicas": 1, "max_replicas": 3, "priority": 5, "model": "/m/big.gguf",
             "reason": "big needs 9 GiB"}]
    assert table(rows).splitlines() == [
        "ID           STATE       READY  MIN  MAX  PRIORITY  MODEL",
        "gemma3-270m  serving     2/2    0    -    0         gemma3-270m",
        "big          not_served  0/0    1    3    5         /m/big.gguf",
        "    big needs 9 GiB",
    ]


@pytest.mark.parametrize(("url", "root"), [("http://h:9337/v1", "http://h:9337"),
                                           ("http://h:9337/v1/", "http://h:9337"),
                                           ("https://h", "https://h")])
def test_models_command_finds_the_gateway_root(url: str, root: str) -> None:
    assert gateway_url(argparse.Namespace(url=url, data_dir="/nonexistent")) == root
