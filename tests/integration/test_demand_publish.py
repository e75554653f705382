"""The gateway's demand record in a real etcd: written under /meshllm/demand/ with the
figures recorded, rewritten only when they change, gone once the publisher stops."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from meshllm.common import store
from meshllm.common.demand import parse_demand
from meshllm.common.membership import LeaseConfig
from meshllm.common.store import EtcdStore
from meshllm.common.types import ModelId
from meshllm.gateway.demand import DemandMeter, DemandPublisher

from tests.support.mesh import LocalMesh, MeshOptions, wait_for
from tests.support.procs import start_etcd

pytestmark = pytest.mark.integration
M = ModelId("gemma3-270m")


@pytest.fixture(scope="module")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root: Path = tmp_path_factory.mktemp("demand-etcd")
    proc, url = start_etcd(root / "data", root)
    try:
        yield url
    finally:
        proc.stop()


async def _records(kv: EtcdStore) -> dict[str, bytes]:
    return await kv.get_prefix(store.DEMAND)


async def _publish_and_stop(url: str) -> None:
    kv = EtcdStore(url)
    await kv.connect(wait_s=10)
    clock = [100.0]  # still, so that the figures do not move between ticks
    meter = DemandMeter(lambda: clock[0], window_s=20, recent_s=5)
    clock[0] = 110.0
    for service_s in (0.5, 1.0, 1.5):
        meter.arrived(M)
        meter.admitted(M, 0.25, service_s, 20)
    meter.arrived(M)
    meter.refused(M)
    publisher = DemandPublisher(kv, meter, "gw-test", lambda: {M}, publish_s=0.2,
                                lease=LeaseConfig(ttl_s=4, keepalive_s=1.0))
    task = asyncio.create_task(publisher.run())
    try:
        for _ in range(50):
            if (raw := await _records(kv)):
                break
            await asyncio.sleep(0.1)
        assert list(raw) == [store.DEMAND + "gw-test"]
        record = parse_demand(raw[store.DEMAND + "gw-test"])
        assert record.gateway_id == "gw-test"
        assert record.window_s == pytest.approx(10)  # an unlisted model was unrequested that long
        (demand,) = record.models
        assert demand.model_id == M
        assert demand.requests == pytest.approx(4)  # 3 admitted + 1 refused
        assert demand.mean_service_s == pytest.approx(1.0)
        assert demand.mean_queue_wait_s == pytest.approx(0.25)
        assert demand.window_s == pytest.approx(10)  # a young gateway says so
        assert demand.recent_requests_per_s == pytest.approx(4 / 5)
        assert demand.idle_s == pytest.approx(0)
        await asyncio.sleep(1.0)  # ~5 ticks, nothing changed: no write
        assert publisher.writes == 1
        clock[0] = 111.0
        meter.arrived(M)
        meter.refused(M)
        await asyncio.sleep(0.5)
        assert publisher.writes == 2
        record = parse_demand((await _records(kv))[store.DEMAND + "gw-test"])
        assert record.models[0].refused_per_s == pytest.approx(2 / 11)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert await _records(kv) == {}  # the lease was revoked, not left to expire
    await kv.close()


def test_record_appears_and_goes(etcd_url: str) -> None:
    asyncio.run(_publish_and_stop(etcd_url))


def _read(url: str) -> dict[str, bytes]:
    async def read() -> dict[str, bytes]:
        kv = EtcdStore(url)
        await kv.connect(wait_s=5)
        try:
            return await _records(kv)
        finally:
            await kv.close()
    return asyncio.run(read())


def test_a_real_gateway_publishes_what_it_served(tmp_path: Path) -> None:
    """Three chat requests through a real mesh show in the gateway's record and status;
    the record goes with the gateway."""
    local = LocalMesh(tmp_path, MeshOptions(
        workers=1, context_length=1024,
        gateway_args=("--demand-publish-s", "0.5", "--gateway-id", "gw-real")))
    try:
        local.start()
        client = openai.OpenAI(base_url=local.base_url + "/v1", api_key="unused",
                               max_retries=0, timeout=120)
        for _ in range(3):
            client.chat.completions.create(
                model=str(M), messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)

        def counted() -> bool:
            raw = _read(local.etcd_url).get(store.DEMAND + "gw-real")
            return raw is not None and parse_demand(raw).models[0].requests >= 3
        wait_for(counted, 20, "three requests in the demand record")
        (demand,) = parse_demand(_read(local.etcd_url)[store.DEMAND + "gw-real"]).models
        assert demand.mean_service_s > 0 and demand.generated_tokens_per_s > 0
        assert demand.refused_per_s == 0 and demand.idle_s < 60
        shown = next(m for m in local.status()["models"] if m["model_id"] == M)["demand"]
        assert shown["requests_per_s"] > 0 and shown["waiting_requests"] == 0
        local.procs["gateway"].stop()
        assert _read(local.etcd_url) == {}  # revoked at exit, not left to expire (10 s)
    finally:
        local.stop()
