"""Reading service configuration from flags and environment variables.

Every service declares its options once (flag, environment variable, parser, default) and
builds its frozen config dataclass from the result in one function. A missing or bad value
fails at start-up with a `ConfigError` naming the flag and the variable.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshllm.common.errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def parse_size(text: str) -> int:
    """Bytes from '512MiB', '4GiB', '2G', '1048576'. Binary and decimal prefixes both work."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 512MiB, 4GiB, 2000000000)")
    unit = (match.group(2) or "").lower().removesuffix("b")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value


def format_size(n_bytes: int) -> str:
    size = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host or "0.0.0.0", int(port)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"must be > 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError(f"must be > 0, got {value}")
    return value


def csv_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class Option:
    flag: str                    # --worker-memory
    env: str                     # MESHLLM_WORKER_MEMORY
    parse: Callable[[str], Any]
    default: str | None          # None: required
    help: str

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def read_options(
    prog: str, options: Sequence[Option], argv: Sequence[str], env: Mapping[str, str]
) -> dict[str, Any]:
    """Parse flags, falling back to environment variables, then defaults."""
    parser = argparse.ArgumentParser(prog=prog)
    for opt in options:
        parser.add_argument(opt.flag, dest=opt.dest, help=f"{opt.help} [env {opt.env}]")
    namespace = parser.parse_args(list(argv))
    values: dict[str, Any] = {}
    for opt in options:
        raw = getattr(namespace, opt.dest)
        if raw is None:
            raw = env.get(opt.env, opt.default)
        if raw is None:
            raise ConfigError(f"{opt.flag} / {opt.env}", "is required")
        try:
            values[opt.dest] = opt.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{opt.flag} / {opt.env}", f"bad value {raw!r}: {exc}") from exc
    return values


def process_env() -> Mapping[str, str]:
    """The environment, read when a service starts (never at import time)."""
    return dict(os.environ)
