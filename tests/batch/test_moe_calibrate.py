"""Calibration on real llama.cpp: the synthetic MoE model (tests/support/moe_gguf.py) run
over a prompt set, the router's top-k tensor counted through the eval callback; the
ranking cached by the model's digest and published to a real etcd by `mesh-llm calibrate`."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshllm.common.convert import parse_ranking
from meshllm.common.errors import ModelSourceError
from meshllm.common.moe import ExpertRanking, model_digest
from meshllm.common.store import EtcdStore
from meshllm.worker.moe_calibrate import (
    DEFAULT_PROMPTS,
    NotAMoeModel,
    cached_ranking,
    calibrate,
    load_ranking,
    ranking_key,
    ranking_path,
    read_prompts,
)
from meshllm.worker.moe_probe import ProbedModel

from tests.support.moe_gguf import MoeSpec, expert_preference, moe_model
from tests.support.procs import free_port, port_open, start_etcd, wait_until

pytestmark = pytest.mark.integration

PROMPTS = ("The capital of France is Paris, and the capital of Italy is Rome.",
           "def square(x):\n    return x * x",
           "1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89")
SKEWED = MoeSpec(n_expert_used=2, router_skew=1.0)
EVEN = MoeSpec(n_expert_used=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.getbasetemp() / "moe-models"
    directory.mkdir(exist_ok=True)
    return directory


@pytest.fixture(scope="module")
def skewed(models: Path) -> Path:
    return moe_model(models, SKEWED)


@pytest.fixture(scope="module")
def ranking(skewed: Path) -> ExpertRanking:
    return calibrate(skewed, PROMPTS)


def n_tokens(model: Path, prompts: tuple[str, ...]) -> int:
    with ProbedModel(model) as probe:
        return sum(len(probe.tokenize(p)) for p in prompts)


def test_counts_every_token_of_every_layer(skewed: Path, ranking: ExpertRanking) -> None:
    tokens = n_tokens(skewed, PROMPTS)
    assert ranking.tokens == tokens
    assert ranking.model_digest == model_digest(skewed)
    assert len(ranking.counts) == SKEWED.n_layer
    for layer in ranking.counts:
        assert len(layer) == SKEWED.n_expert
        assert sum(layer) == tokens * SKEWED.n_expert_used


def test_the_same_input_counts_the_same(skewed: Path, ranking: ExpertRanking) -> None:
    again = calibrate(skewed, PROMPTS)
    assert again.counts == ranking.counts and again.tokens == ranking.tokens


def preferred_share(ranking: ExpertRanking, spec: MoeSpec, layer: int) -> float:
    """The share of the layer's choices that went to its two most preferred experts."""
    preference = expert_preference(spec, layer)
    top = sorted(range(spec.n_expert), key=lambda e: -preference[e])[:2]
    counts = ranking.counts[layer]
    return sum(counts[e] for e in top) / sum(counts)


def test_calibration_finds_the_skewed_router(models: Path) -> None:
    even = calibrate(moe_model(models, EVEN), DEFAULT_PROMPTS)
    skewed = calibrate(moe_model(models, SKEWED), DEFAULT_PROMPTS)
    for layer in range(SKEWED.n_layer):
        # two of eight experts: an even router gives them about a quarter of the choices
        assert preferred_share(skewed, SKEWED, layer) > 0.375, skewed.counts[layer]
        assert preferred_share(skewed, SKEWED, layer) > preferred_share(even, SKEWED, layer)


def test_cached_the_second_time(skewed: Path, tmp_path: Path) -> None:
    first, cached = cached_ranking(skewed, tmp_path, PROMPTS)
    assert not cached and ranking_path(tmp_path, first.model_digest).exists()
    second, cached = cached_ranking(skewed, tmp_path, PROMPTS)
    assert cached and second == first  # the same seconds too: nothing ran
    other, cached = cached_ranking(skewed, tmp_path, PROMPTS[:1])
    assert not cached and other.tokens < first.tokens  # other prompts count again
    refreshed, cached = cached_ranking(skewed, tmp_path, PROMPTS[:1], refresh=True)
    assert not cached and refreshed.counts == other.counts


def test_progress_counts_tokens(skewed: Path) -> None:
    seen: list[tuple[int, int]] = []
    result = calibrate(skewed, PROMPTS, progress=lambda d, t: seen.append((d, t)))
    assert len(seen) == len(PROMPTS)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1] == (result.tokens, result.tokens)


def test_prompt_files(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("first paragraph\nstill the first\n\n\n second \n\n")
    assert read_prompts(path) == ("first paragraph\nstill the first", "second")
    assert read_prompts(None) == DEFAULT_PROMPTS
    path.write_text("\n\n")
    with pytest.raises(ModelSourceError, match="holds no text"):
        read_prompts(path)
    with pytest.raises(ModelSourceError, match="cannot read"):
        read_prompts(tmp_path / "absent.txt")


def test_dense_models_are_refused(tmp_path: Path) -> None:
    from meshllm.common.models import materialize

    with pytest.raises(NotAMoeModel, match="dense model"):
        cached_ranking(materialize("gemma3-270m"), tmp_path)


async def read_key(url: str, key: str) -> bytes:
    store = EtcdStore(url)
    await store.connect(wait_s=10.0)
    try:
        return (await store.get_prefix(key))[key]
    finally:
        await store.close()


def test_cli_calibrates_caches_and_publishes(skewed: Path, tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    etcd, url = start_etcd(tmp_path / "etcd", tmp_path / "logs")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n\n".join(PROMPTS))
    command = [sys.executable, "-m", "meshllm.cli.main", "calibrate", str(skewed),
               "--prompts", str(prompts), "--data-dir", str(tmp_path / "data"),
               "--etcd", url, "--threads", "1"]
    try:
        first = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr
        assert "calibrating: " in first.stderr and "counted in" in first.stdout
        digest = model_digest(skewed)
        assert f"published to /meshllm/moe-rankings/{digest}" in first.stdout
        published = parse_ranking(asyncio.run(read_key(url, ranking_key(digest))))
        assert published.counts == calibrate(skewed, PROMPTS).counts
        second = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0 and "(cached)" in second.stdout, second.stderr
    finally:
        etcd.stop()


@contextlib.contextmanager
def rpc_server(cache: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "meshllm.worker.rpc_server", "--endpoint",
                             f"127.0.0.1:{port}", "--cache-dir", str(cache)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(port), 30, "the RPC server")
        yield f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def test_a_layer_split_counts_as_the_whole_model(skewed: Path, ranking: ExpertRanking,
                                                 tmp_path: Path) -> None:
    """A model no node holds is calibrated over a layer split, as `mesh-llm calibrate
    --rpc` runs it: its last 2 layers (the routers included) on a ggml RPC server, seen by
    the same callback, and the ranking cached as the whole model's would be."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n\n".join(PROMPTS))
    with rpc_server(tmp_path / "cache") as endpoint:
        split = subprocess.run(
            [sys.executable, "-m", "meshllm.cli.main", "calibrate", str(skewed),
             "--prompts", str(prompts), "--data-dir", str(tmp_path / "data"),
             "--threads", "1", "--no-publish", "--rpc", endpoint, "--rpc-layers", "2"],
            capture_output=True, text=True, timeout=300)
    assert split.returncode == 0, split.stderr[-2000:]
    assert "counted in" in split.stdout and "published" not in split.stdout
    cached = load_ranking(tmp_path / "data", model_digest(skewed), PROMPTS)
    assert cached is not None and cached.counts == ranking.counts
