"""Keeping a record alive in the store under a lease.

A service that dies stops refreshing its lease, and the store drops its record when the
lease expires: that is how the rest of the mesh learns it is gone.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from meshllm.common.errors import ConfigError
from meshllm.common.store import KeyValueStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseConfig:
    ttl_s: int = 10           # the record disappears this long after its owner dies
    keepalive_s: float = 3.0  # how often the owner refreshes the lease

    def __post_init__(self) -> None:
        if self.ttl_s < 2 * self.keepalive_s:
            raise ConfigError(
                "lease", f"TTL {self.ttl_s}s must be at least twice the keep-alive period "
                f"{self.keepalive_s}s, or one late refresh would drop the record"
            )


class Registration:
    """Publishes one key under a lease and keeps it alive until withdrawn."""

    def __init__(self, store: KeyValueStore, key: str, lease: LeaseConfig) -> None:
        self._store = store
        self._key = key
        self._lease = lease
        self._lease_id: int | None = None
        self._value = b""
        self._pending = False  # the last published value is not written yet
        self._lock = asyncio.Lock()
        self._withdrawn = False
        self.lease_ok = False  # the last write or refresh succeeded (exported as a metric)

    @property
    def key(self) -> str:
        return self._key

    async def publish(self, value: bytes) -> bool:
        """Write (or rewrite) the record; grants a lease the first time.

        When etcd cannot take it now, the value stays pending and keep_alive() writes the
        latest one as soon as it can: callers (a model host reporting progress, say) never
        fail because etcd is briefly away. Returns whether it was written now.
        """
        async with self._lock:
            if self._withdrawn:
                return True
            self._value, self._pending = value, True
            try:
                if self._lease_id is None:
                    self._lease_id = await self._store.grant_lease(self._lease.ttl_s)
                await self._store.put(self._key, value, self._lease_id)
            except Exception as exc:  # aetcd raises several types; all mean "not now"
                self.lease_ok = False
                log.warning("cannot publish %s now (%s); the keep-alive retries", self._key, exc)
                return False
            self._pending = False
            self.lease_ok = True
            return True

    async def keep_alive(self) -> None:
        """Refresh the lease forever; if it was lost (e.g. etcd restarted), register again;
        write a value that could not be written when it was published."""
        while not self._withdrawn:
            await asyncio.sleep(self._lease.keepalive_s)
            if self._withdrawn:  # a refresh racing the withdrawal must not register again
                return
            try:
                alive = self._lease_id is not None and await self._store.refresh_lease(
                    self._lease_id
                )
            except Exception as exc:  # etcd unreachable: keep trying, the TTL decides
                self.lease_ok = False
                log.warning("cannot refresh lease for %s: %s", self._key, exc)
                continue
            if not alive:
                log.warning("lease for %s expired; registering again", self._key)
                self._lease_id = None
            if not alive or self._pending:
                await self.publish(self._value)

    async def withdraw(self) -> None:
        self._withdrawn = True
        self.lease_ok = False
        if self._lease_id is not None:
            await self._store.revoke_lease(self._lease_id)
            self._lease_id = None
