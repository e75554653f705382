"""A registration survives etcd being away: what could not be written is written later."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from meshllm.common.membership import LeaseConfig, Registration
from meshllm.common.store import WatchEvent


class FlakyStore:
    """Just the lease and put calls of a store; `down` makes them fail as aetcd does."""

    def __init__(self) -> None:
        self.down = False
        self.values: dict[str, bytes] = {}
        self.leases = 0

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("etcd is away")

    async def grant_lease(self, ttl_s: int) -> int:
        self._check()
        self.leases += 1
        return self.leases

    async def put(self, key: str, value: bytes, lease_id: int | None = None) -> None:
        self._check()
        self.values[key] = value

    async def refresh_lease(self, lease_id: int) -> bool:
        self._check()
        return True

    async def revoke_lease(self, lease_id: int) -> None:
        self._check()

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        raise NotImplementedError

    async def snapshot(self, prefix: str) -> tuple[dict[str, bytes], int]:
        raise NotImplementedError

    async def create(self, key: str, value: bytes) -> bool:
        raise NotImplementedError

    async def delete(self, key: str) -> None:
        raise NotImplementedError

    def watch_prefix(self, prefix: str, start_revision: int | None = None
                     ) -> AsyncIterator[WatchEvent]:
        raise NotImplementedError

    async def close(self) -> None:
        pass


async def test_a_value_published_while_etcd_is_away_is_written_by_the_keep_alive() -> None:
    store = FlakyStore()
    registration = Registration(store, "/k", LeaseConfig(ttl_s=1, keepalive_s=0.05))
    assert await registration.publish(b"loading")
    store.down = True
    assert not await registration.publish(b"ready")  # a host reporting progress: no raise
    assert not registration.lease_ok and store.values["/k"] == b"loading"
    keeper = asyncio.create_task(registration.keep_alive())
    await asyncio.sleep(0.12)
    store.down = False
    for _ in range(40):
        if store.values["/k"] == b"ready":
            break
        await asyncio.sleep(0.05)
    keeper.cancel()
    assert store.values["/k"] == b"ready" and registration.lease_ok


async def test_nothing_is_published_after_withdrawal() -> None:
    store = FlakyStore()
    registration = Registration(store, "/k", LeaseConfig(ttl_s=1, keepalive_s=0.05))
    await registration.publish(b"a")
    await registration.withdraw()
    await registration.publish(b"b")
    assert store.values["/k"] == b"a"
