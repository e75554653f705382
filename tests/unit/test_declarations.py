"""Model declarations: their wire form, and how the planner reads, describes and places them."""

from __future__ import annotations

from typing import cast

import pytest
from meshllm.common import convert, store
from meshllm.common.errors import InvalidRecord, ModelSourceError
from meshllm.common.types import (
    ModelDeclaration,
    ModelId,
    ModelSpec,
    WorkerId,
    WorkerInfo,
)
from meshllm.planner.assign import RoundPolicy
from meshllm.planner.declared import ModelCatalog, parse_inputs
from meshllm.planner.place import MiB, PlacementPolicy
from meshllm.planner.service import PlacementBoard, Planner, PlannerSettings
from meshllm.planner.suspects import SuspectMetrics, SuspectPolicy, SuspectProbes
from meshllm.v1 import mesh_pb2
from prometheus_client import CollectorRegistry

from tests.support.memory_kv import MemoryKv

A = ModelDeclaration(ModelId("a"), "a.gguf")
B = ModelDeclaration(ModelId("b"), "/models/b.gguf", min_replicas=1, max_replicas=2,
                     priority=-3)


def spec(name: str, mib: int = 100) -> ModelSpec:
    return ModelSpec(ModelId(name), f"{name}.gguf", mib * MiB, 10, 1, 0, "llama", 1)


def worker(name: str, mib: int = 1000) -> WorkerInfo:
    return WorkerInfo(WorkerId(name), "127.0.0.1:1", "cpu", mib * MiB, 1, 0.0)


@pytest.mark.parametrize("declaration", [A, B, ModelDeclaration(ModelId("c.q8_0"), "c", 3, 0)])
def test_declaration_round_trip(declaration: ModelDeclaration) -> None:
    raw = convert.declaration_to_pb(declaration).SerializeToString()
    assert convert.parse_declaration(raw) == declaration


@pytest.mark.parametrize(("record", "problem"), [
    (mesh_pb2.ModelDeclaration(source="x"), "bad model_id"),
    (mesh_pb2.ModelDeclaration(model_id="../etc", source="x"), "bad model_id"),
    (mesh_pb2.ModelDeclaration(model_id="Big Model", source="x"), "bad model_id"),
    (mesh_pb2.ModelDeclaration(model_id="a" * 129, source="x"), "bad model_id"),
    (mesh_pb2.ModelDeclaration(model_id="a"), "no source"),
    (mesh_pb2.ModelDeclaration(model_id="a", source="x", min_replicas=3, max_replicas=2),
     "min_replicas 3 > max_replicas 2"),
])
def test_invalid_declarations_are_rejected(record: mesh_pb2.ModelDeclaration,
                                           problem: str) -> None:
    with pytest.raises(InvalidRecord, match=problem):
        convert.parse_declaration(record.SerializeToString())


def test_undecodable_declaration_is_rejected() -> None:
    with pytest.raises(InvalidRecord, match="undecodable"):
        convert.parse_declaration(b"\xff\xff\xff")


def test_parse_inputs_keeps_valid_workers_and_declarations_only() -> None:
    raw = {
        store.WORKERS + "w1": convert.worker_to_pb(worker("w1")).SerializeToString(),
        store.WORKERS + "bad": b"\xff\xff",
        store.DECLARATIONS + "b": convert.declaration_to_pb(B).SerializeToString(),
        store.DECLARATIONS + "a": convert.declaration_to_pb(A).SerializeToString(),
        store.DECLARATIONS + "bad": mesh_pb2.ModelDeclaration(model_id="x").SerializeToString(),
        store.PLACEMENTS + "a": b"not read here",
    }
    inputs = parse_inputs(raw)
    assert [w.worker_id for w in inputs.workers] == ["w1"]
    assert inputs.declarations == (A, B)  # by model id


async def test_catalog_describes_each_declaration_once_and_forgets_removed_ones() -> None:
    calls: list[str] = []

    def describe(declaration: ModelDeclaration) -> ModelSpec:
        calls.append(declaration.model_id)
        if declaration.model_id == "b":
            raise ModelSourceError("no such file /models/b.gguf")
        return spec(declaration.model_id)

    catalog = ModelCatalog(describe)
    described = await catalog.describe([A, B])
    assert described[A.model_id] == spec("a")
    assert described[B.model_id] == ("cannot read model /models/b.gguf: "
                                     "no such file /models/b.gguf")
    assert await catalog.describe([A, B]) == described
    assert calls == ["a", "b"]  # read once each
    await catalog.describe([A])
    await catalog.describe([A, B])
    assert calls == ["a", "b", "b"]  # removed, then declared again: read again


async def never_checked(worker: WorkerInfo) -> bool:
    raise AssertionError(f"{worker.worker_id} was checked though nobody reported it")


def kv_with(declarations: list[ModelDeclaration]) -> MemoryKv:
    return MemoryKv({store.DECLARATIONS + d.model_id:
                     convert.declaration_to_pb(d).SerializeToString() for d in declarations})


def declared(kv: MemoryKv) -> set[ModelDeclaration]:
    return {convert.parse_declaration(v) for v in kv.values.values()}


async def test_a_start_declares_its_models_and_undeclares_an_earlier_starts_others() -> None:
    old_start = ModelDeclaration(ModelId("old"), "old.gguf", at_start=True)
    kept = ModelDeclaration(ModelId("kept"), "kept.gguf", max_replicas=2, at_start=True)
    run_time = ModelDeclaration(ModelId("api"), "api.gguf", priority=3)
    kv = kv_with([old_start, kept, run_time])
    again = ModelDeclaration(ModelId("kept"), "kept.gguf", at_start=True)  # settings differ
    new = ModelDeclaration(ModelId("new"), "new.gguf", at_start=True)
    settings = PlannerSettings((again, new), RoundPolicy(PlacementPolicy(0)), 0.0, 5.0)
    planner = Planner(cast(store.KeyValueStore, kv), settings,
                      ModelCatalog(lambda d: spec(d.model_id)), PlacementBoard(),
                      SuspectProbes(never_checked, SuspectPolicy(1.0, 2.0),
                                    SuspectMetrics(CollectorRegistry())))
    await planner.declare_at_start()
    assert declared(kv) == {kept, run_time, new}  # the stored settings of `kept` stay
