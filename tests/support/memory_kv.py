"""An in-memory stand-in for the key-value store's create / put / read / delete, for unit tests
of code that keeps records in etcd (the real etcd is used by the integration tests)."""

from __future__ import annotations


class MemoryKv:
    def __init__(self, values: dict[str, bytes] | None = None) -> None:
        self.values: dict[str, bytes] = dict(values or {})
        self.leases: dict[int, int] = {}  # lease id -> TTL (s); nothing expires here
        self.lease_of: dict[str, int] = {}  # key -> the lease it was put under

    async def grant_lease(self, ttl_s: int) -> int:
        lease_id = len(self.leases) + 1
        self.leases[lease_id] = ttl_s
        return lease_id

    async def put(self, key: str, value: bytes, lease_id: int | None = None) -> None:
        self.values[key] = value
        if lease_id is not None:
            self.lease_of[key] = lease_id

    async def create(self, key: str, value: bytes) -> bool:
        if key in self.values:
            return False
        self.values[key] = value
        return True

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, v in self.values.items() if k.startswith(prefix)}

    async def delete(self, key: str) -> None:
        self.values.pop(key, None)
