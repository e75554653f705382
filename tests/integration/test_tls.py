"""A mesh whose services speak mutual TLS: a split model (tunnel and pings over TLS)
serves through the gateway, and the workers refuse plaintext and foreign certificates."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest
from meshllm.common.grpcutil import check_health

from tests.support.certs import make_node
from tests.support.mesh import LocalMesh, MeshOptions, wait_for

pytestmark = pytest.mark.integration
MODEL = "gemma3-270m"


def test_split_mesh_over_mutual_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = make_node(tmp_path / "certs")
    foreign = make_node(tmp_path / "foreign", ca_name="someone else's CA")
    for key, value in node.env().items():  # every service of the mesh inherits these
        monkeypatch.setenv(key, value)
    mesh = LocalMesh(tmp_path / "mesh", MeshOptions(
        workers=2, worker_memory="1GiB", expect_replicas=1, planner_args=("--split", MODEL),
        worker_args=("--ping-interval-s", "1")))
    try:
        mesh.start()
        client = openai.OpenAI(base_url=mesh.base_url + "/v1", api_key="x", max_retries=0)
        reply = client.completions.create(model=MODEL, prompt="The moon is", max_tokens=8,
                                          temperature=0)
        assert reply.choices[0].text.strip()

        def links_measured() -> bool:  # the pings between the workers go over TLS too
            (model,) = [m for m in mesh.status()["models"] if m["model_id"] == MODEL]
            links = model["replicas"][0]["link_rtt_ms"]
            return bool(links) and all(v is not None for v in links.values())

        wait_for(links_measured, 30, "link round trips over TLS")
        worker = f"127.0.0.1:{mesh.worker_ports['worker-1']}"
        assert asyncio.run(check_health(worker, security=node.security()))
        assert not asyncio.run(check_health(worker))  # plaintext
        assert not asyncio.run(check_health(worker, security=foreign.security()))
    finally:
        mesh.stop()
