"""A worker without the model file still serves its expert shard, with real processes:
two workers too small for the synthetic MoE model whole; worker-2 runs in a mount
namespace where the models directory is empty, so it cannot read the file the planner
describes. It receives its shard from worker-1 (which cuts it from its copy) over
FetchShard, byte for byte the shard a local cut gives, then answers a chat request."""

from __future__ import annotations

import filecmp
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from meshllm.common.models import model_id_for
from meshllm.common.moe import model_digest
from meshllm.common.types import ModelId, WorkerId, WorkerInfo
from meshllm.gateway.sessions import rendezvous, session_key
from meshllm.v1 import worker_pb2, worker_pb2_grpc
from meshllm.worker.shards import ensure_shard, shard_path

from tests.support.mesh import LocalMesh, MeshOptions
from tests.support.moe_budget import shard_budget
from tests.support.moe_gguf import MoeSpec, moe_model

pytestmark = pytest.mark.integration

MOE = MoeSpec(n_ff=2048, n_head=2)  # as test_moe_mesh: an 88 MB model
CONTEXT, SLOTS, SHARD_EXPERTS = 512, 2, 6
RECEIVED = re.compile(r"received from (\S+) in ([\d.]+)s \(([\d.]+)s waiting for the peer to "
                      r"cut it\): (\S+), ([\d.]+) MB, ([\d.]+) MB/s")


class MoeMesh(LocalMesh):
    def ready_replicas(self, model: str = "") -> int:
        return super().ready_replicas(model or model_id_for(self.options.models[0]))


def hiding(directory: Path, empty: Path) -> tuple[str, ...]:
    """A command prefix that runs its command with `directory` looking empty."""
    script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
            str(empty), str(directory))


def mount_namespaces_work(tmp: Path) -> bool:
    (tmp / "seen").mkdir()
    (tmp / "seen" / "file").touch()
    (tmp / "empty").mkdir()
    probe = subprocess.run([*hiding(tmp / "seen", tmp / "empty"), "ls", str(tmp / "seen")],
                           capture_output=True, text=True, check=False)
    return probe.returncode == 0 and probe.stdout.strip() == ""


def budget_for(path: Path) -> int:
    return shard_budget(path, CONTEXT, SLOTS, SHARD_EXPERTS)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MoeMesh]:
    root = tmp_path_factory.mktemp("moe-transfer-mesh")
    if not mount_namespaces_work(root):
        pytest.skip("needs mount namespaces (root and unshare) to hide the model file")
    (root / "models").mkdir()
    path = moe_model(root / "models", MOE)
    options = MeshOptions(
        workers=2, worker_memory=str(budget_for(path)), models=(str(path),),
        context_length=CONTEXT, expect_replicas=2,
        per_worker_args=(("--data-dir", str(root / "data-1")),
                         ("--data-dir", str(root / "data-2"))),
        per_worker_prefix=((), hiding(root / "models", root / "empty")),
        planner_args=("--slots", str(SLOTS)))
    local = MoeMesh(root, options)
    try:
        local.start()
        yield local
    finally:
        local.stop()


def model_status(mesh: LocalMesh) -> dict[str, Any]:
    model = model_id_for(mesh.options.models[0])
    return next(m for m in mesh.status()["models"] if m["model_id"] == model)


def generated(mesh: LocalMesh, name: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{mesh.worker_ports[name]}") as channel:
        stats = worker_pb2_grpc.ShardWorkerStub(channel).GetStats(
            worker_pb2.GetStatsRequest(), timeout=5)
    return int(stats.generated_tokens_total)


def test_a_worker_without_the_file_receives_its_shard_and_serves(mesh: LocalMesh,
                                                                  tmp_path: Path) -> None:
    model = Path(mesh.options.models[0])
    log_1 = mesh.procs["worker-1"].log_path.read_text(errors="replace")
    log_2 = mesh.procs["worker-2"].log_path.read_text(errors="replace")
    found = RECEIVED.search(log_2)
    assert found is not None, log_2[-3000:]
    peer, total_s, waited_s, received, mb, rate = found.groups()
    assert peer == "worker-1" and "cut in" not in log_2  # it had no file to cut from
    assert "cutting an expert shard of" in log_1 and "for worker-2" in log_1

    shard = next(s for s in model_status(mesh)["experts"]["shards"]
                 if s["worker_id"] == "worker-2")
    selection = tuple(tuple(layer) for layer in shard["experts"])
    assert Path(received) == shard_path(Path(mesh.root / "data-2"), model_digest(model),
                                        selection)
    local = ensure_shard(model, tmp_path, selection)  # what a worker with the file cuts
    assert filecmp.cmp(received, local.path, shallow=False)
    print(f"worker-2 received {float(mb):.1f} MB from worker-1 in {total_s} s "
          f"({waited_s} s of it while worker-1 cut it): {rate} MB/s on loopback")

    session = next(s for s in (f"s-{i}" for i in range(50)) if rendezvous(
        session_key(ModelId(model_id_for(str(model))), s),
        [WorkerInfo(WorkerId(n), "", "cpu", 1, 1, 0.0) for n in ("worker-1", "worker-2")]
    )[0].worker_id == "worker-2")
    before = generated(mesh, "worker-2")
    client = openai.OpenAI(base_url=mesh.base_url + "/v1", api_key="x", max_retries=0)
    answer = client.chat.completions.create(
        model=model_id_for(str(model)), max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": "Name a mountain."}],
        extra_headers={"X-Session-Id": session})
    assert answer.choices[0].message.content is not None and answer.usage is not None
    assert generated(mesh, "worker-2") - before == answer.usage.completion_tokens > 0
