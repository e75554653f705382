"""mesh-llm's ggml-rpc build against llama-cpp-python's own, with real llama.cpp processes.

Our library changes only how the client uses its socket, not the protocol, so a head with
either library must drive a stage server with either one, and every pairing must generate
exactly what the model generates whole.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from bench.pipeline_split import Head, start_rpc_servers

TOKENS = 24
LIBRARIES = ("meshllm", "stock")


@pytest.fixture(scope="module")
def whole_text() -> str:
    head = Head([], [])
    try:
        return str(head.generate(TOKENS)["text"])
    finally:
        head.close()


@pytest.mark.integration
@pytest.mark.parametrize(("client", "server"), list(itertools.product(LIBRARIES, LIBRARIES)))
def test_split_through_either_library_equals_whole(tmp_path: Path, whole_text: str,
                                                   client: str, server: str) -> None:
    (proc, port), = start_rpc_servers(1, tmp_path, server)
    try:
        head = Head([f"127.0.0.1:{port}"], [9], library=client)
        try:
            first, again = head.generate(TOKENS), head.generate(TOKENS)
        finally:
            head.close()
    finally:
        proc.kill()
        proc.wait()
    assert first["tokens"] >= TOKENS and whole_text.strip()
    assert first["text"] == again["text"] == whole_text
