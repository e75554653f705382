"""API keys and input limits through a real gateway: a second gateway process with keys
configured, in front of the shared test mesh (its etcd, planner and workers)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from meshllm.gateway.auth import file_line
from openai.types.chat import ChatCompletionMessageParam

from tests.support.mesh import LocalMesh
from tests.support.procs import Proc, free_port, python_module, wait_until

pytestmark = pytest.mark.integration

MODEL = "gemma3-270m"
OPEN_KEY = "mesh-test-open-key"        # from the environment, as `mesh-llm up` passes it
ONLY_SMALL = "mesh-test-only-small"    # a keys-file entry limited to MODEL
TWO_PER_MINUTE = "mesh-test-two-rpm"   # a keys-file entry with rpm=2
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def keyed(mesh: LocalMesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a gateway that needs a key."""
    root = tmp_path_factory.mktemp("keyed-gateway")
    keys_file = root / "keys"
    keys_file.write_text("# test keys\n"
                         f"{file_line('small', ONLY_SMALL)} models={MODEL}\n"
                         f"{file_line('slow', TWO_PER_MINUTE)} rpm=2\n")
    port = free_port()
    proc = Proc("keyed-gateway", python_module(
        "meshllm.gateway", "--etcd", mesh.etcd_url, "--listen", f"127.0.0.1:{port}",
        "--api-keys-file", str(keys_file), "--max-body-size", "64KiB"),
        root, env={"MESHLLM_API_KEYS": OPEN_KEY})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _health(url, proc), 60, "the keyed gateway")
        yield url
    finally:
        proc.stop()
        assert OPEN_KEY not in Path(proc.log_path).read_text()  # never logged


def _health(url: str, proc: Proc) -> bool:
    if not proc.alive():
        raise RuntimeError(f"the keyed gateway exited:\n{proc.log_tail()}")
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_health_stays_open(keyed: str) -> None:
    assert httpx.get(keyed + "/health").json()["status"] == "ok"


def test_a_missing_key_is_401_in_the_openai_shape(keyed: str) -> None:
    response = httpx.get(keyed + "/v1/models")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error", None, "invalid_api_key")


@pytest.mark.parametrize("path", ["/metrics", "/api/status", "/api/status/stream"])
def test_operator_paths_need_a_key_too(keyed: str, path: str) -> None:
    assert httpx.get(keyed + path).status_code == 401
    if path != "/api/status/stream":  # an endless stream: its refusal is what matters
        assert httpx.get(keyed + path, headers={"Authorization": f"Bearer {OPEN_KEY}"}
                         ).status_code == 200


def test_the_console_asks_for_the_key(keyed: str) -> None:
    page = httpx.get(keyed + "/console")
    assert page.status_code == 401 and "API key" in page.text
    with httpx.Client(base_url=keyed) as browser:
        login = browser.post("/console/login", headers={"Authorization": f"Bearer {OPEN_KEY}"})
        assert login.status_code == 200
        assert browser.get("/console").status_code == 200
        assert browser.get("/api/status").json()["models"]


def test_the_openai_client_with_a_wrong_key_fails_to_authenticate(keyed: str) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        _client(keyed, "not-a-key").models.list()
    assert info.value.code == "invalid_api_key"


def test_the_openai_client_with_a_key_works(keyed: str) -> None:
    client = _client(keyed, OPEN_KEY)
    assert MODEL in {m.id for m in client.models.list().data}
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                            max_tokens=4, temperature=0)
    assert answer.choices[0].message.content is not None
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                            max_tokens=4, stream=True)
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_a_model_the_key_may_not_use_is_403(keyed: str) -> None:
    client = _client(keyed, ONLY_SMALL)
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.chat.completions.create(model="huge-test", messages=MESSAGES,
                                       max_tokens=4)
    assert info.value.code == "model_not_allowed"
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices


def test_over_the_requests_per_minute_is_429_with_retry_after(keyed: str) -> None:
    headers = {"Authorization": f"Bearer {TWO_PER_MINUTE}"}
    for _ in range(2):
        assert httpx.get(keyed + "/v1/models", headers=headers).status_code == 200
    refused = httpx.get(keyed + "/v1/models", headers=headers)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError):
        _client(keyed, TWO_PER_MINUTE).models.list()
    # another key is not slowed down by this one
    assert httpx.get(keyed + "/v1/models",
                     headers={"Authorization": f"Bearer {OPEN_KEY}"}).status_code == 200


def test_an_oversized_body_is_413(keyed: str) -> None:
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 100_000}]}
    response = httpx.post(keyed + "/v1/chat/completions", json=big,
                          headers={"Authorization": f"Bearer {OPEN_KEY}"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    unauthenticated = httpx.post(keyed + "/v1/chat/completions", json=big)
    assert unauthenticated.status_code == 401  # the key first: no body read for strangers


def test_mesh_llm_chat_sends_the_key(keyed: str) -> None:
    mesh_llm = str(Path(sys.executable).parent / "mesh-llm")
    argv = [mesh_llm, "chat", MODEL, "--url", keyed + "/v1", "--max-tokens", "4"]
    with_flag = subprocess.run([*argv, "--api-key", OPEN_KEY], input="Hi\n",
                               capture_output=True, text=True, timeout=120)
    assert with_flag.returncode == 0, with_flag.stdout + with_flag.stderr
    assert "API key" not in with_flag.stdout and "error" not in with_flag.stdout.lower()
    from_env = subprocess.run(argv, input="Hi\n", capture_output=True, text=True, timeout=120,
                              env={**os.environ, "MESHLLM_API_KEY": OPEN_KEY})
    assert from_env.returncode == 0, from_env.stdout + from_env.stderr
    assert "API key" not in from_env.stdout
    without = subprocess.run(argv, input="Hi\n", capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "MESHLLM_API_KEY"})
    assert "didn't provide an API key" in without.stdout  # the turn fails, saying why
