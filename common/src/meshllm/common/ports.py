"""Ports for servers we are about to start, picked below the kernel's ephemeral range.

Asking the kernel for a free port (bind to port 0) hands out one from the same range it uses
for the local end of outgoing connections. Between that check and the moment the child
process binds the port, any outgoing connection of any process may take it, and the child
then dies with "address in use". Ports below the ephemeral range are never handed to outgoing
connections, so a port checked free there stays free unless another server binds it.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LINUX_EPHEMERAL_LOW = 32768  # the kernel's default, where the range cannot be read
POOL_LOW = 20000  # above the registered ports most local services use (5432, 6379, 8080, ...)
MIN_POOL_SIZE = 2000  # with less room below the ephemeral range, fall back to bind(0)


def ephemeral_low(range_file: Path = EPHEMERAL_RANGE_FILE) -> int:
    try:
        return int(range_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return LINUX_EPHEMERAL_LOW


def bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def kernel_free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class PortPicker:
    """Hands out bindable ports one after another from a random start in the pool, so that
    its own picks do not repeat until the pool wraps (two servers started at once by one
    process never get the same port)."""

    def __init__(self, host: str = "127.0.0.1", range_file: Path = EPHEMERAL_RANGE_FILE,
                 rng: random.Random | None = None) -> None:
        self.host = host
        self.pool = range(POOL_LOW, ephemeral_low(range_file))
        self._next = (rng or random.Random()).randrange(len(self.pool)) if self.pool else 0

    def pick(self) -> int:
        if len(self.pool) < MIN_POOL_SIZE:
            return kernel_free_port(self.host)
        for _ in range(len(self.pool)):
            port = self.pool[self._next % len(self.pool)]
            self._next += 1
            if bindable(self.host, port):
                return port
        return kernel_free_port(self.host)
