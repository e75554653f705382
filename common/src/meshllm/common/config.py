"""Reading service configuration from flags and environment variables.

Every service declares its options once (flag, environment variable, parser, default) and
builds its frozen config dataclass from the result in one function. A missing or bad value
fails at start-up with a `ConfigError` naming the flag and the variable.

Options that several services have (etcd, log level, metrics port, lease TTL, advertise
address; TLS in `meshllm.common.tls`) are declared here once and shared. An option is either
mesh-wide (the same value suits every process of a mesh: etcd, TLS, log level) or
`per_process` (it names or addresses one process: listen and advertise addresses, metrics
port, ids, data directories); a launcher never hands a per-process variable of its own
environment on to the processes it starts.
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


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # NaN too
        raise ValueError(f"must be >= 0, got {text}")
    return value


def csv_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value < 65536:
        raise ValueError(f"not a port: {value}")
    return value


def choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return text
    return parse


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL")


def log_level_name(text: str) -> str:
    level = text.strip().upper()
    if level not in _LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(_LOG_LEVELS)}")
    return level


@dataclass(frozen=True)
class Option:
    flag: str                    # --worker-memory
    env: str                     # MESHLLM_WORKER_MEMORY
    parse: Callable[[str], Any]
    default: str | None          # None: required
    help: str
    repeat: bool = False         # flag given once per item; variable and default comma-separated
    per_process: bool = False    # names or addresses one process: never inherited from a launcher
    switch: bool = False         # a bare flag means "true" (parse with on_off); =false also works

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def key(self) -> str:
        """How errors name the option: '--flag / MESHLLM_VARIABLE'."""
        return f"{self.flag} / {self.env}"


def read_options(
    prog: str, options: Sequence[Option], argv: Sequence[str], env: Mapping[str, str]
) -> dict[str, Any]:
    """Parse flags, falling back to environment variables, then defaults. A repeatable
    option's value is the tuple of its parsed items."""
    parser = argparse.ArgumentParser(prog=prog)
    for opt in options:
        if opt.repeat:
            parser.add_argument(opt.flag, dest=opt.dest, action="append",
                                help=f"{opt.help}; repeatable [env {opt.env}, comma-separated]")
        elif opt.switch:
            parser.add_argument(opt.flag, dest=opt.dest, nargs="?", const="true",
                                metavar="true|false", help=f"{opt.help} [env {opt.env}]")
        else:
            parser.add_argument(opt.flag, dest=opt.dest, help=f"{opt.help} [env {opt.env}]")
    namespace = parser.parse_args(list(argv))
    return {opt.dest: _value(opt, getattr(namespace, opt.dest), env) for opt in options}


def _value(opt: Option, given: str | list[str] | None, env: Mapping[str, str]) -> Any:
    raw = env.get(opt.env, opt.default) if given is None else given
    if raw is None:
        raise ConfigError(opt.key, "is required")
    try:
        if isinstance(raw, list):  # a repeatable flag, given once per item
            return tuple(opt.parse(item) for item in raw)
        if opt.repeat:
            return tuple(opt.parse(item) for item in csv_list(raw))
        return opt.parse(raw)
    except ValueError as exc:
        raise ConfigError(opt.key, f"bad value {raw!r}: {exc}") from exc


def on_off(text: str) -> bool:
    """A yes/no setting: on, true, yes, 1 or off, false, no, 0 (any case)."""
    word = text.strip().lower()
    if word not in ("on", "true", "yes", "1", "off", "false", "no", "0"):
        raise ValueError("expected on or off (true or false)")
    return word in ("on", "true", "yes", "1")


def listen_option(env: str, default: str, what: str) -> Option:
    """A service's own listen address; each service has its own variable and default."""
    return Option("--listen", env, str, default, f"{what} listen address (HOST:PORT)",
                  per_process=True)


ETCD_OPTION = Option("--etcd", "MESHLLM_ETCD", str, "http://127.0.0.1:2379", "etcd URL")
LOG_LEVEL_OPTION = Option("--log-level", "MESHLLM_LOG_LEVEL", log_level_name, "INFO",
                          "logging level: DEBUG, INFO, WARNING, ERROR")
METRICS_PORT_OPTION = Option("--metrics-port", "MESHLLM_METRICS_PORT", port_number, "0",
                             "Prometheus port (0: off)", per_process=True)
LEASE_TTL_OPTION = Option("--lease-ttl-s", "MESHLLM_LEASE_TTL_S", positive_int, "10",
                          "seconds after this node dies until it leaves the mesh "
                          "(its etcd lease TTL)")
ADVERTISE_ADDRESS_OPTION = Option(
    "--advertise-address", "MESHLLM_ADVERTISE_ADDRESS", str, "",
    "HOST:PORT the other nodes dial to reach this one (default 127.0.0.1:<listen port>)",
    per_process=True)


def process_env() -> Mapping[str, str]:
    """The environment, read when a service starts (never at import time)."""
    return dict(os.environ)


def export_to_process(switches: Mapping[str, str]) -> None:
    """Sets variables in this process's environment: for native libraries whose only
    switch is a variable they read themselves (ggml's kernel choice, batch/numerics.py)."""
    os.environ.update(switches)
