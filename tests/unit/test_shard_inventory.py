"""What a worker advertises it can send peers lacking a MoE model's file (inventory): the
files it reads with the planner's sha256, the shards in its cache; and that both survive
the trip through its etcd record."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from meshllm.common import convert
from meshllm.common.models import describe
from meshllm.common.types import ModelId, ModelSpec, WorkerId, WorkerInfo
from meshllm.worker.inventory import Inventory
from meshllm.worker.shards import ensure_shard, shard_name

from tests.support.moe_gguf import MoeSpec, moe_model


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    return describe(str(moe_model(tmp_path_factory.mktemp("moe-inventory"), MoeSpec())), 512)


async def test_a_worker_lists_the_files_it_reads_and_the_shards_it_has(
        spec: ModelSpec, tmp_path: Path) -> None:
    inventory = Inventory(tmp_path)
    absent = dataclasses.replace(spec, model_id=ModelId("gone"), source=str(tmp_path / "gone.gguf"),
                                 model_digest="f" * 64)
    other_file = dataclasses.replace(spec, model_id=ModelId("other"), model_digest="e" * 64)
    assert await inventory.refresh([spec, absent, other_file])
    assert (inventory.model_files, inventory.expert_shards) == ((spec.model_digest,), ())

    ensure_shard(Path(spec.source), tmp_path, ((1, 3),) * 3)
    assert await inventory.refresh([spec])
    assert inventory.expert_shards == (shard_name(spec.model_digest, ((1, 3),) * 3),)
    assert not await inventory.refresh([spec])  # nothing changed: nothing to publish


def test_the_record_carries_them() -> None:
    info = WorkerInfo(WorkerId("w"), "127.0.0.1:1", "cpu", 1, 1, 0.0,
                      model_files=("a" * 64,), expert_shards=("aaaa-bbbb",))
    assert convert.worker_from_pb(convert.worker_to_pb(info)) == info
