"""The blackboard service's configuration: flags, environment variables, one dataclass."""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshllm.common.config import (
    ADVERTISE_ADDRESS_OPTION,
    ETCD_OPTION,
    LEASE_TTL_OPTION,
    LOG_LEVEL_OPTION,
    METRICS_PORT_OPTION,
    Option,
    choice,
    listen_option,
    parse_host_port,
    parse_size,
    positive_float,
    positive_int,
    read_options,
)
from meshllm.common.errors import ConfigError
from meshllm.common.membership import LeaseConfig
from meshllm.common.telemetry import TraceSettings, trace_settings
from meshllm.common.tls import PLAINTEXT, TLS_OPTIONS, GrpcSecurity, security_from

OPTIONS = (
    listen_option("MESHLLM_BLACKBOARD_LISTEN", "0.0.0.0:9339", "gRPC"),
    ADVERTISE_ADDRESS_OPTION,
    ETCD_OPTION,
    Option("--data-dir", "MESHLLM_DATA_DIR", Path, "data/blackboard", "where posts persist",
           per_process=True),
    Option("--node-id", "MESHLLM_NODE_ID", str, "", "unique node name (default HOSTNAME-PORT)",
           per_process=True),
    METRICS_PORT_OPTION,
    Option("--max-text-bytes", "MESHLLM_BLACKBOARD_MAX_TEXT_BYTES", parse_size, "4KiB",
           "largest post text"),
    Option("--posts-per-author-per-minute", "MESHLLM_BLACKBOARD_POSTS_PER_AUTHOR_PER_MINUTE",
           positive_int, "10", "rate limit per author"),
    Option("--retention-h", "MESHLLM_BLACKBOARD_RETENTION_H", positive_float, "48",
           "posts expire this long after they were made"),
    Option("--max-posts", "MESHLLM_BLACKBOARD_MAX_POSTS", positive_int, "100000",
           "posts kept per node; the oldest expire first"),
    Option("--on-secret", "MESHLLM_BLACKBOARD_ON_SECRET", choice("refuse", "redact"), "refuse",
           "what to do with a post carrying credentials"),
    Option("--anti-entropy-interval-s", "MESHLLM_BLACKBOARD_ANTI_ENTROPY_INTERVAL_S",
           positive_float, "5", "period of anti-entropy rounds"),
    Option("--anti-entropy-fanout", "MESHLLM_BLACKBOARD_ANTI_ENTROPY_FANOUT", positive_int, "2",
           "peers pulled from per round"),
    Option("--peer-timeout-s", "MESHLLM_BLACKBOARD_PEER_TIMEOUT_S", positive_float, "3",
           "deadline of calls to peers"),
    Option("--prune-interval-s", "MESHLLM_BLACKBOARD_PRUNE_INTERVAL_S", positive_float, "30",
           "period of expiry"),
    Option("--embed-model", "MESHLLM_BLACKBOARD_EMBED_MODEL", str, "",
           "model that embeds posts for search by meaning ('' = the first that embeds, "
           "'off' = words only)"),
    LEASE_TTL_OPTION,
    LOG_LEVEL_OPTION,
    *TLS_OPTIONS,
)


@dataclass(frozen=True)
class BlackboardConfig:
    listen: str             # HOST:PORT of the Blackboard gRPC service
    advertise_address: str  # HOST:PORT; "" until the port is bound: see advertise_for()
    etcd_url: str
    data_dir: Path          # where posts persist
    node_id: str            # "" until the port is bound
    metrics_port: int       # TCP port of the Prometheus endpoint; 0: off
    max_text_bytes: int
    posts_per_author_per_minute: int
    retention_h: float
    max_posts: int
    on_secret: str          # refuse | redact
    anti_entropy_interval_s: float
    anti_entropy_fanout: int  # peers per round
    peer_timeout_s: float
    prune_interval_s: float
    embed_model: str        # "" = the first model on the mesh that embeds; "off" = none
    lease: LeaseConfig      # TTL and keep-alive period (s) of this node's etcd record
    log_level: str          # logging level name
    trace: TraceSettings    # what the OTEL_* variables ask for
    security: GrpcSecurity = PLAINTEXT  # plaintext or mutual TLS, for serving and gossip

    def advertise_for(self, bound_port: int) -> str:
        return self.advertise_address or f"127.0.0.1:{bound_port}"

    def node_id_for(self, bound_port: int) -> str:
        return self.node_id or f"{socket.gethostname()}-{bound_port}"


def load_config(argv: Sequence[str], env: Mapping[str, str]) -> BlackboardConfig:
    values = read_options("python -m meshllm.blackboard", OPTIONS, argv, env)
    security = security_from(values)
    fields = {k: v for k, v in values.items() if not k.startswith("tls_")}
    etcd_url, ttl_s = fields.pop("etcd"), fields.pop("lease_ttl_s")
    config = BlackboardConfig(**fields, etcd_url=etcd_url,
                              lease=LeaseConfig(ttl_s=ttl_s, keepalive_s=ttl_s / 3),
                              trace=trace_settings("blackboard", env), security=security)
    _check(config)
    return config


def _check(config: BlackboardConfig) -> None:
    for key, value in (("--listen / MESHLLM_BLACKBOARD_LISTEN", config.listen),
                       (ADVERTISE_ADDRESS_OPTION.key, config.advertise_address)):
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
