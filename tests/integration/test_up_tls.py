"""`mesh-llm up --tls` as a user runs it: HTTPS at the gateway with a CA made under the data
directory, mutual TLS on every gRPC link inside (a plaintext or foreign client is refused),
and `mesh-llm chat` finding the CA by itself."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from meshllm.cli.local_mesh import read_local_mesh
from meshllm.cli.status_cmd import read_status
from meshllm.common.grpcutil import check_health
from meshllm.common.store import EtcdStore, StoreUnavailable
from meshllm.common.tls import security_from_env

from tests.integration.up_process import MESH_LLM, UpProcess
from tests.support.certs import make_node

pytestmark = pytest.mark.integration
MODEL = "gemma3-270m"


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    process = UpProcess(tmp_path_factory.mktemp("up-tls") / "data", "--tls", "--workers", "1",
                        "--worker-memory", "1GiB")
    try:
        process.wait_for("Ready: https://localhost:", 300)
        yield process
    finally:
        process.signal(signal.SIGINT)
        try:
            process.popen.wait(30)
        finally:
            process.kill_everything()


def ca_of(up: UpProcess) -> Path:
    return up.data_dir / "tls" / "ca.pem"


def test_https_with_the_mesh_ca_serves_and_says_what_to_trust(up: UpProcess) -> None:
    assert f"clients trust {ca_of(up)}" in up.output
    trusting = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(ca_of(up))))
    client = openai.OpenAI(base_url=f"https://localhost:{up.port}/v1", api_key="unused",
                           http_client=trusting, max_retries=0)
    reply = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4,
                                      temperature=0)
    assert reply.choices[0].text


def test_plain_http_and_untrusting_clients_are_refused(up: UpProcess) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{up.port}/health", timeout=5)
    stranger = openai.OpenAI(base_url=f"https://localhost:{up.port}/v1", api_key="unused",
                             max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        stranger.models.list()  # the system's CAs do not know the mesh's


def test_grpc_inside_is_mutual_tls(up: UpProcess, tmp_path: Path) -> None:
    status = subprocess.run([MESH_LLM, "status", "--data-dir", str(up.data_dir), "--json"],
                            capture_output=True, text=True, timeout=60, check=True)
    address = json.loads(status.stdout)["nodes"][0]["address"]
    tls = up.data_dir / "tls"
    mesh = security_from_env("test", {"MESHLLM_TLS_CERT": str(tls / "node.pem"),
                                      "MESHLLM_TLS_KEY": str(tls / "node-key.pem"),
                                      "MESHLLM_TLS_CA": str(tls / "ca.pem")})
    foreign = make_node(tmp_path / "foreign", "another CA").security()
    assert asyncio.run(check_health(address, security=mesh))
    assert not asyncio.run(check_health(address))                      # plaintext
    assert not asyncio.run(check_health(address, security=foreign))    # another CA


def test_etcd_admits_only_holders_of_the_mesh_certificate(up: UpProcess,
                                                          tmp_path: Path) -> None:
    local = read_local_mesh(up.data_dir)
    assert local is not None and local.certs is not None
    assert local.etcd_url.startswith("https://127.0.0.1:")
    status = asyncio.run(read_status(local.etcd_url, local.certs.security()))
    assert [n.worker_id for n in status.nodes] == ["worker-1"]
    foreign = make_node(tmp_path / "foreign", "another CA").security()
    with pytest.raises(StoreUnavailable):
        asyncio.run(_connect(EtcdStore(local.etcd_url, foreign)))
    with pytest.raises(StoreUnavailable):   # plaintext to the TLS port
        asyncio.run(_connect(EtcdStore(local.etcd_url.replace("https", "http"))))


async def _connect(store: EtcdStore) -> None:
    try:
        await store.connect(wait_s=2.0)
    finally:
        await store.close()


def test_chat_finds_the_ca_of_its_mesh(up: UpProcess) -> None:
    chat = subprocess.run([MESH_LLM, "chat", "--data-dir", str(up.data_dir), "--max-tokens",
                           "4"], input="Hello\n", capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0, chat.stdout + chat.stderr
    assert f"at https://localhost:{up.port}/v1" in chat.stdout
