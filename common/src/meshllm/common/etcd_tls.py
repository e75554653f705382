"""An aetcd client that reaches etcd over mutual TLS.

aetcd 1.0 opens only plaintext channels. This subclass opens its channel with the mesh's
certificate instead and then sets up the same stubs and watcher that aetcd's own `connect`
does, so every other method of the client works unchanged. It depends on those attribute
names, which is why aetcd is pinned (common/pyproject.toml).
"""

from __future__ import annotations

from typing import Any

import aetcd
from aetcd import rpc, watcher
from meshllm.common.tls import GrpcSecurity


class TlsEtcdClient(aetcd.Client):  # type: ignore[misc]
    def __init__(self, host: str, port: int, timeout_s: float, security: GrpcSecurity) -> None:
        super().__init__(host=host, port=port, timeout=timeout_s)
        self._security = security

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        channel: Any = self._security.channel(f"{self._host}:{self._port}",
                                              list(self._options.items()))
        self.channel = channel
        self.kvstub = rpc.KVStub(channel)
        self.clusterstub = rpc.ClusterStub(channel)
        self.leasestub = rpc.LeaseStub(channel)
        self.maintenancestub = rpc.MaintenanceStub(channel)
        self._watcher = watcher.Watcher(rpc.WatchStub(channel), timeout=self._timeout,
                                        metadata=self.metadata)
        self._connected.set()
