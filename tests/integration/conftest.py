"""A shared mesh for the API tests (non-destructive ones only)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from meshllm.common.models import materialize

from tests.support.mesh import LocalMesh, MeshOptions


def make_huge_model(directory: Path) -> Path:
    """A GGUF whose header is real but whose size (sparse) exceeds every worker's budget."""
    source = materialize("gemma3-270m")
    path = directory / "huge-test.gguf"
    with source.open("rb") as src, path.open("wb") as dst:
        dst.write(src.read(16 * 1024 * 1024))
        dst.truncate(64 * 1024**3)
    return path


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    root = tmp_path_factory.mktemp("mesh")
    huge = make_huge_model(root)
    local = LocalMesh(root, MeshOptions(models=("gemma3-270m", str(huge))))
    try:
        local.start()
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="session")
def client(mesh: LocalMesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.base_url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="session")
def aclient(mesh: LocalMesh) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=mesh.base_url + "/v1", api_key="unused", max_retries=0,
                              timeout=300)
