"""The blackboard service's configuration: flags, environment variables, one dataclass."""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshllm.common.config import (
    Option,
    parse_host_port,
    parse_size,
    positive_float,
    positive_int,
    read_options,
)
from meshllm.common.errors import ConfigError
from meshllm.common.membership import LeaseConfig
from meshllm.common.tls import PLAINTEXT, TLS_OPTIONS, GrpcSecurity, security_from


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return text
    return parse


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value < 65536:
        raise ValueError(f"not a port: {value}")
    return value


OPTIONS = (
    Option("--listen", "MESHLLM_BLACKBOARD_LISTEN", str, "0.0.0.0:9339", "gRPC listen address"),
    Option("--advertise-address", "MESHLLM_ADVERTISE_ADDRESS", str, "",
           "HOST:PORT peers dial (default 127.0.0.1:<listen port>)"),
    Option("--etcd", "MESHLLM_ETCD", str, "http://127.0.0.1:2379", "etcd URL"),
    Option("--data-dir", "MESHLLM_DATA_DIR", Path, "data/blackboard", "where posts persist"),
    Option("--node-id", "MESHLLM_NODE_ID", str, "", "unique node name (default HOSTNAME-PORT)"),
    Option("--metrics-port", "MESHLLM_METRICS_PORT", _port, "0", "Prometheus port; 0 = off"),
    Option("--max-text-bytes", "MESHLLM_BLACKBOARD_MAX_TEXT_BYTES", parse_size, "4KiB",
           "largest post text"),
    Option("--posts-per-author-per-minute", "MESHLLM_BLACKBOARD_POSTS_PER_AUTHOR_PER_MINUTE",
           positive_int, "10", "rate limit per author"),
    Option("--retention-h", "MESHLLM_BLACKBOARD_RETENTION_H", positive_float, "48",
           "posts expire this long after they were made"),
    Option("--max-posts", "MESHLLM_BLACKBOARD_MAX_POSTS", positive_int, "100000",
           "posts kept per node; the oldest expire first"),
    Option("--on-secret", "MESHLLM_BLACKBOARD_ON_SECRET", _choice("refuse", "redact"), "refuse",
           "what to do with a post carrying credentials"),
    Option("--anti-entropy-interval-s", "MESHLLM_BLACKBOARD_ANTI_ENTROPY_INTERVAL_S",
           positive_float, "5", "period of anti-entropy rounds"),
    Option("--anti-entropy-fanout", "MESHLLM_BLACKBOARD_ANTI_ENTROPY_FANOUT", positive_int, "2",
           "peers pulled from per round"),
    Option("--peer-timeout-s", "MESHLLM_BLACKBOARD_PEER_TIMEOUT_S", positive_float, "3",
           "deadline of calls to peers"),
    Option("--prune-interval-s", "MESHLLM_BLACKBOARD_PRUNE_INTERVAL_S", positive_float, "30",
           "period of expiry"),
    Option("--lease-ttl-s", "MESHLLM_LEASE_TTL_S", positive_int, "10",
           "etcd lease TTL of this node's record"),
    Option("--log-level", "MESHLLM_LOG_LEVEL", str, "INFO", "logging level"),
    *TLS_OPTIONS,
)


@dataclass(frozen=True)
class BlackboardConfig:
    listen: str
    advertise_address: str  # "" until the port is bound: see advertise_for()
    etcd: str
    data_dir: Path
    node_id: str            # "" until the port is bound
    metrics_port: int
    max_text_bytes: int
    posts_per_author_per_minute: int
    retention_h: float
    max_posts: int
    on_secret: str
    anti_entropy_interval_s: float
    anti_entropy_fanout: int
    peer_timeout_s: float
    prune_interval_s: float
    lease_ttl_s: int
    log_level: str
    security: GrpcSecurity = PLAINTEXT  # plaintext or mutual TLS, for serving and gossip

    @property
    def lease(self) -> LeaseConfig:
        return LeaseConfig(ttl_s=self.lease_ttl_s, keepalive_s=self.lease_ttl_s / 3)

    def advertise_for(self, bound_port: int) -> str:
        return self.advertise_address or f"127.0.0.1:{bound_port}"

    def node_id_for(self, bound_port: int) -> str:
        return self.node_id or f"{socket.gethostname()}-{bound_port}"


def load_config(argv: Sequence[str], env: Mapping[str, str]) -> BlackboardConfig:
    values = read_options("python -m meshllm.blackboard", OPTIONS, argv, env)
    security = security_from(values)
    fields = {k: v for k, v in values.items() if not k.startswith("tls_")}
    config = BlackboardConfig(**fields, security=security)
    _check(config)
    return config


def _check(config: BlackboardConfig) -> None:
    for key, value in (("--listen / MESHLLM_BLACKBOARD_LISTEN", config.listen),
                       ("--advertise-address / MESHLLM_ADVERTISE_ADDRESS",
                        config.advertise_address)):
        if value:
            try:
                parse_host_port(value)
            except ValueError as exc:
                raise ConfigError(key, str(exc)) from exc
    if config.max_text_bytes > 64 * 1024:
        raise ConfigError("--max-text-bytes / MESHLLM_BLACKBOARD_MAX_TEXT_BYTES",
                          "at most 64KiB (the wire limit peers accept)")
    if "/" in config.node_id or config.node_id.strip() != config.node_id:
        raise ConfigError("--node-id / MESHLLM_NODE_ID", "must not contain '/' or spaces")
