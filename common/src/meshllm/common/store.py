"""Membership store: a small key-value interface with leases and prefix watches.

Services talk to `KeyValueStore`; `EtcdStore` is the etcd implementation (aetcd).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlparse

import aetcd
from meshllm.common.errors import ConfigError, MeshError
from meshllm.common.etcd_tls import TlsEtcdClient
from meshllm.common.tls import PLAINTEXT, GrpcSecurity

log = logging.getLogger(__name__)

ROOT = "/meshllm/"
WORKERS = ROOT + "workers/"
MODELS = ROOT + "models/"
PLACEMENTS = ROOT + "placements/"
DECLARATIONS = ROOT + "declarations/"
DEMAND = ROOT + "demand/"  # one leased record per gateway (common.demand.GatewayDemand)
MOE_RANKINGS = ROOT + "moe-rankings/"  # <model digest>: an ExpertRanking (calibration)
SUSPECTS = ROOT + "suspects/"  # <worker id>: a SuspectReport under its reporter's lease
# <worker id>: the planner's SuspectReport on a reported worker that did not answer its
# check, so left out of the plans (no lease: it counts only while a report lives)
LEFT_OUT = ROOT + "left-out/"


class StoreUnavailable(MeshError):
    """etcd could not be reached. Check that it runs and that --etcd points at it."""


@dataclass(frozen=True)
class WatchEvent:
    key: str
    value: bytes | None  # None: the key was deleted (or its lease expired)


class KeyValueStore(Protocol):
    async def get_prefix(self, prefix: str) -> dict[str, bytes]: ...
    async def snapshot(self, prefix: str) -> tuple[dict[str, bytes], int]: ...
    async def put(self, key: str, value: bytes, lease_id: int | None = None) -> None: ...
    async def create(self, key: str, value: bytes) -> bool: ...
    async def delete(self, key: str) -> None: ...
    async def grant_lease(self, ttl_s: int) -> int: ...
    async def refresh_lease(self, lease_id: int) -> bool: ...
    async def revoke_lease(self, lease_id: int) -> None: ...
    def watch_prefix(
        self, prefix: str, start_revision: int | None = None
    ) -> AsyncIterator[WatchEvent]: ...
    async def close(self) -> None: ...


def parse_etcd_url(url: str) -> tuple[str, int]:
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if not parsed.hostname or parsed.scheme not in ("http", "https"):
        raise ConfigError("etcd", f"expected a URL like http://127.0.0.1:2379, got {url!r}")
    return parsed.hostname, parsed.port or 2379


class EtcdStore:
    """`KeyValueStore` over etcd v3."""

    def __init__(self, url: str, security: GrpcSecurity = PLAINTEXT,
                 timeout_s: float = 5.0) -> None:
        """An https:// URL is reached over mutual TLS with `security` (the mesh's
        certificate: etcd then admits only nodes that hold one); http:// in plaintext."""
        host, port = parse_etcd_url(url)
        self.url = url
        if not url.startswith("https://"):
            self._client = aetcd.Client(host=host, port=port, timeout=timeout_s)
        elif security.tls:
            self._client = TlsEtcdClient(host, port, timeout_s, security)
        else:
            raise ConfigError("etcd", f"{url} is https: give this node the mesh's certificate "
                              "(--tls-cert, --tls-key, --tls-ca or MESHLLM_TLS_*) to reach it")

    async def connect(self, wait_s: float = 30.0) -> None:
        """Connect, retrying for `wait_s`: services may start before etcd is up."""
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            try:
                await self._client.connect()
                await self._client.status()
                return
            except Exception as exc:  # aetcd raises several types; all mean "not yet"
                if asyncio.get_running_loop().time() > deadline:
                    raise StoreUnavailable(
                        f"cannot reach etcd at {self.url} after {wait_s:.0f}s: {exc}"
                    ) from exc
                log.info("waiting for etcd at %s", self.url)
                await asyncio.sleep(1.0)

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        result = await self._client.get_prefix(prefix.encode())
        return {kv.key.decode(): kv.value for kv in result}

    async def snapshot(self, prefix: str) -> tuple[dict[str, bytes], int]:
        """The contents under `prefix` and the store revision they were read at."""
        result = await self._client.get_prefix(prefix.encode())
        return {kv.key.decode(): kv.value for kv in result}, int(result.header.revision)

    async def put(self, key: str, value: bytes, lease_id: int | None = None) -> None:
        await self._client.put(key.encode(), value, lease=lease_id)

    async def create(self, key: str, value: bytes) -> bool:
        """Put `key` only if it is absent, atomically; whether it was written."""
        txn = self._client.transactions
        succeeded, _ = await self._client.transaction(
            compare=[txn.version(key.encode()) == 0], success=[txn.put(key.encode(), value)],
            failure=[])
        return bool(succeeded)

    async def delete(self, key: str) -> None:
        await self._client.delete(key.encode())

    async def grant_lease(self, ttl_s: int) -> int:
        lease = await self._client.lease(ttl_s)
        return int(lease.id)

    async def refresh_lease(self, lease_id: int) -> bool:
        reply = await self._client.refresh_lease(lease_id)
        return reply is not None and int(reply.TTL) > 0

    async def revoke_lease(self, lease_id: int) -> None:
        await self._client.revoke_lease(lease_id)

    async def watch_prefix(
        self, prefix: str, start_revision: int | None = None
    ) -> AsyncIterator[WatchEvent]:
        watch = await self._client.watch_prefix(prefix.encode(), start_revision=start_revision)
        try:
            async for event in watch:
                deleted = event.kind == "DELETE"
                yield WatchEvent(event.kv.key.decode(), None if deleted else event.kv.value)
        finally:
            with contextlib.suppress(Exception):
                await watch.cancel()

    async def close(self) -> None:
        await self._client.close()


async def mirror_prefix(store: KeyValueStore, prefix: str) -> AsyncIterator[dict[str, bytes]]:
    """Yield the full contents under `prefix`: first a snapshot, then after every change.

    The watch starts at the revision after the snapshot, so no change falls in between;
    if the watch breaks (etcd restarted, network cut), the snapshot is read again.
    """
    while True:
        try:
            state, revision = await store.snapshot(prefix)
            yield dict(state)
            async for event in store.watch_prefix(prefix, start_revision=revision + 1):
                if event.value is None:
                    state.pop(event.key, None)
                else:
                    state[event.key] = event.value
                yield dict(state)
        except Exception as exc:  # any transport failure: resynchronise from a snapshot
            log.warning("watch on %s broke (%s); resynchronising in 1 s", prefix, exc)
        await asyncio.sleep(1.0)


async def write_changed(store: KeyValueStore, held: Mapping[str, bytes],
                        wanted: Mapping[str, bytes]) -> list[str]:
    """Makes the keys of `held` (what a prefix holds now) into `wanted`: deletes those not
    wanted, puts those new or changed, and returns the keys it put. An unchanged record is
    not written, since every write wakes each watcher of the prefix."""
    for key in held.keys() - wanted.keys():
        await store.delete(key)
    written = [key for key, value in wanted.items() if held.get(key) != value]
    for key in written:
        await store.put(key, wanted[key])
    return written
