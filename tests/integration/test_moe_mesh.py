"""A mixture-of-experts model served by expert shards, with real processes: three workers,
each with a budget too small for the synthetic MoE model whole, each cut their own shard
(the trunk and 6 of its 8 experts) and serve it; the status shows the experts per shard;
a session (`user`, or X-Session-Id) sticks to one shard; killing that shard's worker moves
its sessions, and only its sessions, to another shard, and requests still succeed; a
calibration published then has the two shards left dealt again by it. The tests run in
order on one mesh (the kill and the calibration change it for those after them).

Which shard served a request is read from the workers' own token counters, and the shard
each session goes to is the one the gateway's rendezvous hash predicts."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from meshllm.common import convert, store
from meshllm.common.models import model_id_for
from meshllm.common.moe import ExpertRanking, model_digest
from meshllm.common.store import EtcdStore
from meshllm.common.types import ModelId, WorkerId, WorkerInfo
from meshllm.gateway.sessions import rendezvous, session_key
from meshllm.v1 import worker_pb2, worker_pb2_grpc

from tests.observability.cdp import Browser
from tests.support.mesh import LocalMesh, MeshOptions, wait_for
from tests.support.moe_budget import shard_budget
from tests.support.moe_gguf import MoeSpec, moe_model

pytestmark = pytest.mark.integration

MOE = MoeSpec(n_ff=2048, n_head=2)  # head size 32: the Q8_0 KV cache of reproducible mode
CONTEXT, SLOTS, SHARD_EXPERTS = 512, 8, 6
WORKERS = ("worker-1", "worker-2", "worker-3")


class MoeMesh(LocalMesh):
    model_id: ModelId = ModelId("")

    def ready_replicas(self, model: str = "") -> int:
        return super().ready_replicas(model or self.model_id)


def budget_for(path: Path) -> int:
    return shard_budget(path, CONTEXT, SLOTS, SHARD_EXPERTS)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MoeMesh]:
    root = tmp_path_factory.mktemp("moe-mesh")
    (root / "models").mkdir()
    path = moe_model(root / "models", MOE)
    options = MeshOptions(
        workers=3, worker_memory=str(budget_for(path)), models=(str(path),),
        context_length=CONTEXT, expect_replicas=3,
        worker_args=("--data-dir", str(root / "data")),
        planner_args=("--slots", str(SLOTS)))
    local = MoeMesh(root, options)
    local.model_id = model_id_for(str(path))
    try:
        local.start()
        yield local
    finally:
        local.stop()


def generated(mesh: LocalMesh, names: tuple[str, ...]) -> dict[str, int]:
    counts = {}
    for name in names:
        with grpc.insecure_channel(f"127.0.0.1:{mesh.worker_ports[name]}") as channel:
            counts[name] = worker_pb2_grpc.ShardWorkerStub(channel).GetStats(
                worker_pb2.GetStatsRequest(), timeout=5).generated_tokens_total
    return counts


def served_by(mesh: MoeMesh, names: tuple[str, ...], user: str = "", header: str = "") -> str:
    """Which worker served one completion of the session."""
    client = openai.OpenAI(base_url=mesh.base_url + "/v1", api_key="x", max_retries=0)
    before = generated(mesh, names)
    answer = client.completions.create(
        model=mesh.model_id, prompt="The mountains of the north are", max_tokens=8,
        temperature=0, user=user or openai.omit,
        extra_headers={"X-Session-Id": header} if header else None)
    assert answer.choices[0].text and answer.usage is not None
    after = generated(mesh, names)
    movers = [n for n in names if after[n] > before[n]]
    assert len(movers) == 1, (before, after)
    return movers[0]


def predicted(mesh: MoeMesh, session: str, names: tuple[str, ...]) -> str:
    workers = [WorkerInfo(WorkerId(n), "", "cpu", 1, 1, 0.0) for n in names]
    return rendezvous(session_key(mesh.model_id, session), workers)[0].worker_id


def test_three_workers_serve_the_model_by_expert_shards(mesh: MoeMesh) -> None:
    model = next(m for m in mesh.status()["models"] if m["model_id"] == mesh.model_id)
    experts = model["experts"]
    assert experts["coverage"] == 2 and experts["ranking"] == "even deal, no calibration"
    assert sorted(s["worker_id"] for s in experts["shards"]) == list(WORKERS)
    for shard in experts["shards"]:
        assert [len(layer) for layer in shard["experts"]] == [SHARD_EXPERTS] * MOE.n_layer
        assert shard["summary"].startswith("layers 0-2: ")
    assert all(not r["split"] for r in model["replicas"]) and len(model["replicas"]) == 3
    report_shards(mesh)


def test_the_console_shows_the_experts_of_each_shard(mesh: MoeMesh, tmp_path: Path) -> None:
    browser = Browser(tmp_path / "chromium-profile")
    try:
        page = browser.open(mesh.base_url + "/console")
        page.wait_for("document.querySelectorAll('[data-shard]').length === 3")
        head = page.evaluate(f"document.querySelector('[data-experts=\"{mesh.model_id}\"]')"
                             ".textContent")
        assert "3 expert shards of 8 experts" in head and "coverage 2" in head
        shards = page.evaluate("[...document.querySelectorAll('[data-shard]')]"
                               ".map(s => s.textContent)")
        assert all(text.split(": ", 1)[1].startswith("layers 0-2: ") for text in shards)
    finally:
        browser.close()


def report_shards(mesh: MoeMesh) -> None:
    """Prints what building the shards cost, from the workers' logs (for the record)."""
    full = Path(mesh.options.models[0]).stat().st_size
    for name in WORKERS:
        found = re.search(r"cut in ([\d.]+)s: (\S+), ([\d.]+) MB, ([\d.]+) MB/s",
                          mesh.procs[name].log_path.read_text(errors="replace"))
        assert found is not None, mesh.procs[name].log_tail()
        seconds, path, mb, rate = found.groups()
        print(f"{name}: shard {float(mb):.1f} MB = {float(mb) * 1e6 / full:.2f} of the "
              f"{full / 1e6:.1f} MB model, cut in {seconds} s ({rate} MB/s)")
        assert Path(path).is_file()


def test_a_session_sticks_to_its_shard_and_moves_when_it_dies(mesh: MoeMesh) -> None:
    alice = predicted(mesh, "alice", WORKERS)
    bob = next(u for u in (f"bob-{i}" for i in range(50))
               if predicted(mesh, u, WORKERS) != alice)
    assert [served_by(mesh, WORKERS, user="alice") for _ in range(3)] == [alice] * 3
    assert served_by(mesh, WORKERS, user=bob) == predicted(mesh, bob, WORKERS)
    assert served_by(mesh, WORKERS, header="alice") == alice  # the header names it too

    mesh.procs[alice].kill(signal.SIGKILL)
    rest = tuple(n for n in WORKERS if n != alice)
    moved = predicted(mesh, "alice", rest)
    assert [served_by(mesh, rest, user="alice") for _ in range(3)] == [moved] * 3
    assert served_by(mesh, rest, user=bob) == predicted(mesh, bob, WORKERS)  # bob stays

    def shards_left() -> bool:
        model = next(m for m in mesh.status()["models"] if m["model_id"] == mesh.model_id)
        return len(model["experts"]["shards"]) == 2 and model["experts"]["coverage"] >= 1

    wait_for(shards_left, 30, "the planner to drop the dead shard")
    assert served_by(mesh, rest, user="alice") == moved


def shards_cut(mesh: MoeMesh, name: str) -> int:
    log = mesh.procs[name].log_path.read_text(errors="replace")
    return len(re.findall(r"expert shard of .* cut in", log))


def publish_ranking(mesh: MoeMesh, ranking: ExpertRanking) -> None:
    async def put() -> None:
        kv = EtcdStore(mesh.etcd_url)
        await kv.connect()
        try:
            await kv.put(store.MOE_RANKINGS + ranking.model_digest,
                         convert.ranking_to_pb(ranking).SerializeToString())
        finally:
            await kv.close()
    asyncio.run(put())


def test_a_calibration_arriving_deals_the_shards_again(mesh: MoeMesh) -> None:
    """After the kill above: the two shards left, dealt evenly, are dealt by the ranking and
    reload; the status says how the ranking was obtained; requests succeed."""
    digest = model_digest(Path(mesh.options.models[0]))
    hot = [7, 6, 5, 4, 3, 2, 1, 0]  # expert 7 most chosen in every layer, then 6...
    counts = tuple(tuple(100 - hot.index(e) for e in range(MOE.n_expert))
                   for _ in range(MOE.n_layer))
    publish_ranking(mesh, ExpertRanking(digest, counts, 1234, 0.5))

    def status() -> dict[str, Any]:
        return next(m for m in mesh.status()["models"] if m["model_id"] == mesh.model_id)

    wait_for(lambda: status()["experts"]["ranking"] == "calibrated with 1234 tokens", 30,
             "the planner to deal by the calibration")
    rest = tuple(s["worker_id"] for s in status()["experts"]["shards"])
    wait_for(lambda: all(shards_cut(mesh, n) == 2 for n in rest), 120,
             "the workers to cut their new shards")
    wait_for(lambda: status()["ready_replicas"] == 2, 120, "the new shards to load")
    model = status()
    for shard in model["experts"]["shards"]:  # the hot experts are on every shard
        assert all({7, 6} <= set(layer) for layer in shard["experts"])
    assert served_by(mesh, rest, user="carol") == predicted(mesh, "carol", rest)
