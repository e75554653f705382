"""A worker's expert shards: the plan an expert-shard replica gives it, and the cache it
cuts shards into (real surgery on the synthetic MoE file; no llama.cpp here)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from meshllm.common.gguf import read_header
from meshllm.common.meshview import MeshSnapshot
from meshllm.common.moe import model_digest, moe_layout, shard_bytes
from meshllm.common.types import (
    LoadState,
    ModelId,
    ModelSpec,
    Placement,
    Replica,
    WorkerId,
    whole,
)
from meshllm.worker.engines import EngineSettings
from meshllm.worker.hosts import HostDeps, ModelHost
from meshllm.worker.plans import HostPlan, Role, assigned_plans
from meshllm.worker.shards import ensure_shard, selection_key, shard_path
from meshllm.worker.stage import StageServer

from tests.support.moe_gguf import MoeSpec, moe_model

M = ModelId("moe")
A, B = WorkerId("a"), WorkerId("b")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return moe_model(tmp_path_factory.mktemp("moe-models"), MoeSpec())


def test_selection_keys_tell_selections_apart() -> None:
    assert selection_key(((0, 1), (2, 3))) == selection_key(((0, 1), (2, 3)))
    assert selection_key(((0, 1), (2, 3))) != selection_key(((0, 1), (3, 2)))
    assert selection_key(((0, 1), (2, 3))) != selection_key(((0, 1, 2), (3,)))
    assert shard_path(Path("/d"), "ab" * 32, ((0,),)).parent == Path("/d/shards")


def test_a_shard_replica_plans_a_whole_host_with_its_experts(model: Path) -> None:
    layout = moe_layout(read_header(model))
    assert layout is not None
    spec = ModelSpec(M, str(model), model.stat().st_size, 3, 512, 10, "llama", 512, moe=layout)
    experts = ((0, 1, 2, 3, 4),) * layout.moe_layers
    shard = Replica(whole(A, 3).stages, experts=experts)
    other = Replica(whole(B, 3).stages, experts=((3, 4, 5, 6, 7),) * layout.moe_layers)
    snapshot = MeshSnapshot({}, {M: spec}, {M: Placement(M, (shard, other), 10**9)})
    plan = assigned_plans(snapshot, A)[M]
    assert (plan.role, plan.experts) == (Role.WHOLE, experts)
    lacking = layout.total_bytes - shard_bytes(layout, 5)
    assert plan.required_bytes == 10**9 - lacking


def test_a_shard_is_cut_once_then_reused(model: Path, tmp_path: Path) -> None:
    selection = ((1, 2, 5, 7),) * 3
    seen: list[float] = []
    first = ensure_shard(model, tmp_path, selection, progress=seen.append)
    assert first.built and first.path.is_file()
    assert first.path.name.startswith(model_digest(model)[:16])
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)
    assert read_header(first.path).get_int("llama.expert_count") == 4
    mtime = first.path.stat().st_mtime_ns
    again = ensure_shard(model, tmp_path, selection)
    assert (again.built, again.path, again.path.stat().st_mtime_ns) == (False, first.path,
                                                                        mtime)
    assert [p.name for p in (tmp_path / "shards").iterdir()] == [first.path.name]


def test_workers_building_one_shard_at_once_both_get_a_whole_file(model: Path,
                                                                  tmp_path: Path) -> None:
    selection = ((0, 3, 4),) * 3
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        ensure_shard(model, tmp_path, selection))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.path for r in results}) == 1
    layout = moe_layout(read_header(results[0].path))
    assert layout is not None and layout.expert_count == 3
    assert [p.name for p in (tmp_path / "shards").iterdir()] == [results[0].path.name]


def no_tunnels(address: str, model: str) -> object:
    raise AssertionError("a shard is one whole model: it needs no tunnel")


class RecordingEngine:
    """Loads whatever it is given, at once, and remembers what that was."""

    loaded: list[Path] = []

    def __init__(self, settings: EngineSettings) -> None:
        RecordingEngine.loaded.append(Path(settings.load.model_path))
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def start(self) -> None:
        pass

    async def wait_exited(self) -> int:
        return await self.exited

    async def stop(self) -> None:
        if not self.exited.done():
            self.exited.set_result(0)


async def test_a_host_cuts_its_shard_reporting_progress_then_loads_it(model: Path,
                                                                      tmp_path: Path) -> None:
    layout = moe_layout(read_header(model))
    assert layout is not None
    spec = ModelSpec(M, str(model), model.stat().st_size, 3, 64, 10, "llama", 512, moe=layout)
    experts = ((0, 2, 4, 6),) * layout.moe_layers
    deps = HostDeps(RecordingEngine, no_tunnels, StageServer, 1,  # type: ignore[arg-type]
                    "127.0.0.1", tmp_path / "rpc", False, False, restart_backoff_s=0.01,
                    data_dir=tmp_path / "data")
    phases: list[tuple[str, float]] = []

    async def on_change() -> None:
        phases.append((host.state.phase, host.state.progress))

    RecordingEngine.loaded.clear()
    host = ModelHost(HostPlan(spec, Role.WHOLE, 0, 3, experts=experts), deps, on_change)
    host.start()
    async with asyncio.timeout(10):
        while host.state.state is not LoadState.READY:
            await asyncio.sleep(0.01)
    await host.stop()
    assert RecordingEngine.loaded == [shard_path(tmp_path / "data", model_digest(model),
                                                 experts)]
    building = [p for phase, p in phases if phase == "building expert shard"]
    assert building and building[-1] == 1.0  # it said so while it cut, up to the end
    assert read_header(RecordingEngine.loaded[0]).get_int("llama.expert_count") == 4
