"""Gateway configuration: flags and MESHLLM_* environment variables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshllm.common.config import (
    ETCD_OPTION,
    LOG_LEVEL_OPTION,
    Option,
    listen_option,
    parse_host_port,
    positive_float,
    read_options,
)
from meshllm.common.errors import ConfigError
from meshllm.common.telemetry import TraceSettings, trace_settings
from meshllm.common.tls import TLS_OPTIONS, GrpcSecurity, security_from


@dataclass(frozen=True)
class GatewayConfig:
    etcd_url: str
    host: str                     # of --listen: the HTTP address
    port: int                     # TCP port of --listen
    blackboard_address: str       # host:port of a blackboard node ("" : no blackboard API)
    first_token_timeout_s: float  # includes queueing behind other requests on the worker
    token_timeout_s: float        # longest silence between two tokens
    log_level: str                # logging level name
    trace: TraceSettings        # what the OTEL_* variables ask for
    security: GrpcSecurity      # plaintext or mutual TLS towards workers and blackboard


OPTIONS = (
    ETCD_OPTION,
    listen_option("MESHLLM_GATEWAY_LISTEN", "0.0.0.0:9337", "HTTP"),
    Option("--blackboard", "MESHLLM_BLACKBOARD", str, "",
           "blackboard node host:port for /api/blackboard (empty: off)"),
    Option("--first-token-timeout-s", "MESHLLM_FIRST_TOKEN_TIMEOUT_S", positive_float, "600",
           "seconds to wait for a first token"),
    Option("--token-timeout-s", "MESHLLM_TOKEN_TIMEOUT_S", positive_float, "60",
           "seconds to wait between tokens"),
    LOG_LEVEL_OPTION,
    *TLS_OPTIONS,
)


def load_config(argv: Sequence[str], env: Mapping[str, str]) -> GatewayConfig:
    v = read_options("mesh-llm gateway", OPTIONS, argv, env)
    try:
        host, port = parse_host_port(v["listen"])
    except ValueError as exc:
        raise ConfigError("--listen / MESHLLM_GATEWAY_LISTEN", str(exc)) from exc
    return GatewayConfig(
        etcd_url=v["etcd"], host=host, port=port, blackboard_address=v["blackboard"],
        first_token_timeout_s=v["first_token_timeout_s"],
        token_timeout_s=v["token_timeout_s"], log_level=v["log_level"],
        trace=trace_settings("gateway", env), security=security_from(v),
    )
