"""An in-memory stand-in for the key-value store's create / read / delete, for unit tests
of code that keeps records in etcd (the real etcd is used by the integration tests)."""

from __future__ import annotations


class MemoryKv:
    def __init__(self, values: dict[str, bytes] | None = None) -> None:
        self.values: dict[str, bytes] = dict(values or {})

    async def create(self, key: str, value: bytes) -> bool:
        if key in self.values:
            return False
        self.values[key] = value
        return True

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, v in self.values.items() if k.startswith(prefix)}

    async def delete(self, key: str) -> None:
        self.values.pop(key, None)
