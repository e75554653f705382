"""Capacity follows demand on a real mesh: three workers that each hold one replica, two
models (the real gemma3 file and a copy under another name). Load on the model with one
replica takes a replica from the idle model, with no request failing during the move; a
model removed while it streams drains its streams before it goes."""

from __future__ import annotations

import asyncio
import shutil
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from meshllm.common.models import materialize

from tests.support.mesh import LocalMesh, MeshOptions, wait_for

pytestmark = pytest.mark.integration

HOT = "gemma3-270m"
IDLE = "gemma-idle"
FOLLOW_WITHIN_S = 120.0  # from the load's start to the hot model's second ready replica
FAST_REBALANCE = (  # the defaults wait minutes on purpose (hysteresis); a test cannot
    "--rebalance-interval-s", "1", "--min-age-s", "3", "--cooldown-s", "3",
    "--min-window-s", "5", "--min-requests", "4")
FAST_DEMAND = ("--demand-window-s", "20", "--demand-recent-s", "5",
               "--demand-publish-s", "1")
SLOTS = 8  # set, not left to the default: how many streams make a replica hot follows it
HOT_STREAMS = SLOTS + 2  # every slot busy, and a queue behind them


def ready(mesh: LocalMesh, model: str) -> int:
    return mesh.ready_replicas(model)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    root = tmp_path_factory.mktemp("demand-mesh")
    idle_file = root / f"{IDLE}.gguf"
    shutil.copyfile(materialize(HOT), idle_file)
    # One replica (about 480 MiB at 1,024 tokens and 8 slots) fits each worker, two do not.
    options = MeshOptions(workers=3, worker_memory="700MiB", models=(HOT, str(idle_file)),
                          context_length=1024, expect_replicas=1,
                          planner_args=(*FAST_REBALANCE, "--slots", str(SLOTS)),
                          gateway_args=FAST_DEMAND)
    local = LocalMesh(root, options)
    try:
        local.start()
        # The idle model's name sorts first, so filling the third worker gave it two.
        wait_for(lambda: ready(local, IDLE) == 2, 180, f"two ready replicas of {IDLE}")
        yield local
    finally:
        local.stop()


async def one_request(client: openai.AsyncOpenAI, model: str, max_tokens: int
                      ) -> str | None:
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Count to twenty."}],
        max_tokens=max_tokens, temperature=0, stream=True)
    finish = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    return finish


async def keep_busy(client: openai.AsyncOpenAI, model: str, until: asyncio.Event,
                    outcomes: list[str], max_tokens: int = 24, pause_s: float = 0.0) -> None:
    while not until.is_set():
        try:
            outcomes.append(await one_request(client, model, max_tokens) or "no finish")
        except openai.APIError as exc:
            outcomes.append(f"failed: {exc}")
        await asyncio.sleep(pause_s)


async def load_until_moved(mesh: LocalMesh) -> tuple[float, list[str], list[str]]:
    client = openai.AsyncOpenAI(base_url=mesh.base_url + "/v1", api_key="unused",
                                max_retries=0, timeout=120)
    moved = asyncio.Event()
    hot: list[str] = []
    idle: list[str] = []
    tasks = [asyncio.create_task(keep_busy(client, HOT, moved, hot))
             for _ in range(HOT_STREAMS)]
    tasks.append(asyncio.create_task(keep_busy(client, IDLE, moved, idle, 8, 2.0)))
    started = time.monotonic()
    try:
        while time.monotonic() - started < FOLLOW_WITHIN_S:
            if await asyncio.to_thread(ready, mesh, HOT) >= 2:
                break
            await asyncio.sleep(0.5)
        took = time.monotonic() - started
        await asyncio.sleep(3.0)  # requests in flight across the move end now
    finally:
        moved.set()
        await asyncio.gather(*tasks)
        await client.close()
    return took, hot, idle


def test_load_on_one_model_moves_a_worker_to_it_with_no_failed_request(
        mesh: LocalMesh) -> None:
    assert ready(mesh, HOT) == 1
    took, hot, idle = asyncio.run(load_until_moved(mesh))
    print(f"\nload followed in {took:.1f} s; {len(hot)} requests to {HOT}, {len(idle)} to "
          f"{IDLE}, during the move")
    assert took < FOLLOW_WITHIN_S, mesh.logs()
    assert ready(mesh, HOT) == 2
    failed = [o for o in hot + idle if o not in ("stop", "length")]
    assert not failed, failed
    wait_for(lambda: ready(mesh, IDLE) == 1, 30, f"{IDLE} down to one replica")


def call(mesh: LocalMesh, method: str, path: str) -> int:
    request = urllib.request.Request(mesh.base_url + path, method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status)


def held_by_workers(mesh: LocalMesh, model: str) -> int:
    nodes: list[dict[str, Any]] = mesh.status()["nodes"]
    return sum(1 for n in nodes if model in n.get("models", {}))


async def stream_while_removed(mesh: LocalMesh) -> tuple[str | None, float]:
    client = openai.AsyncOpenAI(base_url=mesh.base_url + "/v1", api_key="unused",
                                max_retries=0, timeout=120)
    try:
        stream = await client.chat.completions.create(
            model=IDLE, messages=[{"role": "user", "content": "Tell a long story."}],
            max_tokens=160, temperature=0, stream=True)
        finish, removed_at = None, 0.0
        async for chunk in stream:
            if not removed_at:
                removed_at = time.monotonic()
                await asyncio.to_thread(call, mesh, "DELETE", f"/api/models/{IDLE}")
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return finish, time.monotonic() - removed_at
    finally:
        await client.close()


def test_a_model_removed_while_it_streams_drains_then_disappears(mesh: LocalMesh) -> None:
    finish, streamed_after_s = asyncio.run(stream_while_removed(mesh))
    assert finish in ("stop", "length"), mesh.logs()
    print(f"\nthe stream went on {streamed_after_s:.1f} s after its model was removed")
    gone = wait_for(lambda: held_by_workers(mesh, IDLE) == 0, 30, f"{IDLE} unloaded")
    print(f"unloaded {gone:.1f} s after the stream ended")
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=mesh.base_url + "/v1", api_key="unused").chat.completions \
            .create(model=IDLE, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
