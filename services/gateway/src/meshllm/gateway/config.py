"""Gateway configuration: flags and MESHLLM_* environment variables."""

from __future__ import annotations

import dataclasses
import math
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshllm.common.config import (
    ETCD_OPTION,
    LOG_LEVEL_OPTION,
    Option,
    csv_list,
    listen_option,
    non_negative_float,
    non_negative_int,
    parse_host_port,
    parse_size,
    positive_float,
    positive_int,
    read_options,
)
from meshllm.common.errors import ConfigError
from meshllm.common.telemetry import TraceSettings, trace_settings
from meshllm.common.tls import TLS_OPTIONS, GrpcSecurity, security_from
from meshllm.gateway.auth import ApiKey, keys_checked, parse_keys_file, plain_key, plain_keys
from meshllm.gateway.limits import MAX_CHOICES, MAX_STOP_SEQUENCES, MAX_TOOLS, InputLimits


def finite_positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be a finite number > 0, got {text}")
    return value


@dataclass(frozen=True)
class DemandSettings:
    """How this gateway measures demand and publishes it for the planner."""

    gateway_id: str = "gateway"  # its record's key under /meshllm/demand/
    window_s: float = 60.0       # the sliding window rates and means cover
    recent_s: float = 10.0       # the short window that shows a rise at once
    publish_s: float = 5.0       # how often the record is written (at most)


@dataclass(frozen=True)
class StreamTiming:
    """How long the gateway waits on workers, and how it carries a stream past one that
    fails mid-generation (gateway.migration)."""

    first_token_timeout_s: float = 600.0  # includes queueing behind others on the worker
    token_timeout_s: float = 60.0         # longest silence between two tokens
    cold_start_wait_s: float = 0.0        # a request's wait for a model's first replica
    stall_probe_s: float = 1.0    # silence after which the worker is asked if it lives
    probe_timeout_s: float = 1.0  # the answer's deadline: none, and the stream moves
    max_migrations: int = 3       # moves of one request before it ends with an error
    migrate_wait_s: float = 60.0  # a moving stream's wait for a replica to carry it on


@dataclass(frozen=True)
class GatewayConfig:
    etcd_url: str
    host: str                     # of --listen: the HTTP address
    port: int                     # TCP port of --listen
    blackboard_address: str       # host:port of a blackboard node ("" : no blackboard API)
    timing: StreamTiming          # timeouts, the progress watchdog, migrations
    log_level: str                # logging level name
    trace: TraceSettings        # what the OTEL_* variables ask for
    security: GrpcSecurity      # plaintext or mutual TLS towards workers and blackboard
    api_keys: tuple[ApiKey, ...]  # () : the gateway takes anyone
    limits: InputLimits           # on each request's size and fields
    cors_origins: tuple[str, ...]  # origins browsers may call from (() : CORS off)
    https: HttpsFiles | None = None  # None: plain HTTP
    demand: DemandSettings = DemandSettings()


@dataclass(frozen=True)
class HttpsFiles:
    cert: Path  # PEM: the server certificate, then any intermediates
    key: Path   # PEM: its private key


HTTPS_OPTIONS = (
    Option("--https-cert", "MESHLLM_HTTPS_CERT", str, "",
           "PEM certificate (chain) to serve the API over HTTPS with (empty: plain HTTP)"),
    Option("--https-key", "MESHLLM_HTTPS_KEY", str, "", "the HTTPS certificate's key, PEM"),
)


BASE_OPTIONS = (
    ETCD_OPTION,
    dataclasses.replace(
        listen_option("MESHLLM_GATEWAY_LISTEN", "", "HTTP"),
        help="HTTP listen address (HOST:PORT; default: 0.0.0.0:9337 with API keys, "
             "127.0.0.1:9337 without: an open gateway is not exposed unless told to be)"),
    Option("--blackboard", "MESHLLM_BLACKBOARD", str, "",
           "blackboard node host:port for /api/blackboard (empty: off)"),
    Option("--first-token-timeout-s", "MESHLLM_FIRST_TOKEN_TIMEOUT_S", positive_float, "600",
           "seconds to wait for a first token"),
    Option("--token-timeout-s", "MESHLLM_TOKEN_TIMEOUT_S", positive_float, "60",
           "seconds to wait between tokens"),
    Option("--cold-start-wait-s", "MESHLLM_COLD_START_WAIT_S", non_negative_float, "120",
           "seconds a request for a model with no ready replica waits while one loads "
           "(0: answer 503 at once)"),
    Option("--stall-probe-s", "MESHLLM_STALL_PROBE_S", positive_float, "1",
           "seconds without a token after which the worker is asked whether it is alive"),
    Option("--probe-timeout-s", "MESHLLM_PROBE_TIMEOUT_S", positive_float, "1",
           "seconds a worker has to answer that question before its streams move"),
    Option("--max-migrations", "MESHLLM_MAX_MIGRATIONS", non_negative_int, "3",
           "times one request may move to another replica mid-stream (0: never)"),
    Option("--migrate-wait-s", "MESHLLM_MIGRATE_WAIT_S", non_negative_float, "60",
           "seconds a stream whose worker failed waits for a replica to carry it on"),
    LOG_LEVEL_OPTION,
    *TLS_OPTIONS,
)
DEMAND_OPTIONS = (
    Option("--gateway-id", "MESHLLM_GATEWAY_ID", str, "",
           "unique id of this gateway's demand record (default hostname-port)",
           per_process=True),
    Option("--demand-window-s", "MESHLLM_DEMAND_WINDOW_S", finite_positive_float, "60",
           "seconds of requests the published demand covers"),
    Option("--demand-recent-s", "MESHLLM_DEMAND_RECENT_S", finite_positive_float, "10",
           "seconds of the short window that shows a rise in demand at once"),
    Option("--demand-publish-s", "MESHLLM_DEMAND_PUBLISH_S", finite_positive_float, "5",
           "seconds between writes of the demand record to etcd (at most one each)"),
)
API_KEY_OPTION = Option("--api-key", "MESHLLM_API_KEYS", plain_key, "",
                        "API key the gateway accepts (Authorization: Bearer KEY)", repeat=True)
API_KEYS_FILE_OPTION = Option(
    "--api-keys-file", "MESHLLM_API_KEYS_FILE", str, "",
    "file of accepted keys, one a line: NAME sha256:HEX [rpm=N] [tpm=N] [concurrent=N] "
    "[models=A,B]")
ACCESS_OPTIONS = (
    API_KEY_OPTION,
    API_KEYS_FILE_OPTION,
    Option("--cors-origins", "MESHLLM_CORS_ORIGINS", csv_list, "",
           "comma-separated origins browsers may call the API from (* : any; empty: CORS off)"),
)
# The gateway's limits on one request: (option, InputLimits field). Defaults: InputLimits.
LIMIT_OPTIONS = (
    (Option("--max-body-size", "MESHLLM_MAX_BODY_SIZE", parse_size, "4MiB",
            "largest request body (413 above), e.g. 4MiB"), "max_body_bytes"),
    (Option("--max-json-depth", "MESHLLM_MAX_JSON_DEPTH", positive_int, "64",
            "deepest nesting of arrays and objects in a request"), "max_json_depth"),
    (Option("--max-messages", "MESHLLM_MAX_MESSAGES", positive_int, "2048",
            "most messages (or input items) in a request"), "max_messages"),
    (Option("--max-tools", "MESHLLM_MAX_TOOLS", positive_int, str(MAX_TOOLS),
            "most tools in a request"), "max_tools"),
    (Option("--max-output-tokens", "MESHLLM_MAX_OUTPUT_TOKENS", int, "0",
            "largest max_tokens a request may ask for, in tokens (0: up to the context)"),
     "max_output_tokens"),
    (Option("--max-n", "MESHLLM_MAX_N", positive_int, str(MAX_CHOICES),
            "most choices (n) per request"), "max_n"),
    (Option("--max-stop", "MESHLLM_MAX_STOP", positive_int, str(MAX_STOP_SEQUENCES),
            "most stop sequences per request"), "max_stop"),
    (Option("--max-stop-chars", "MESHLLM_MAX_STOP_CHARS", positive_int, "256",
            "longest stop sequence, in characters"), "max_stop_chars"),
)
# What the request parsers themselves accept: a limit may tighten these, not widen them.
PARSER_MAXIMA = {"max_tools": MAX_TOOLS, "max_n": MAX_CHOICES, "max_stop": MAX_STOP_SEQUENCES}
OPTIONS = (*BASE_OPTIONS, *DEMAND_OPTIONS, *ACCESS_OPTIONS, *HTTPS_OPTIONS,
           *(opt for opt, _ in LIMIT_OPTIONS))


DEFAULT_PORT = 9337


def default_host(keys_configured: bool) -> str:
    """Where a gateway not told where to listen does: everywhere once it needs a key, else
    on loopback only, where nobody else can use it."""
    return "0.0.0.0" if keys_configured else "127.0.0.1"


def default_listen(keys_configured: bool) -> str:
    return f"{default_host(keys_configured)}:{DEFAULT_PORT}"


def load_config(argv: Sequence[str], env: Mapping[str, str]) -> GatewayConfig:
    v = read_options("mesh-llm gateway", OPTIONS, argv, env)
    keys = api_keys(v["api_key"], v["api_keys_file"])
    try:
        host, port = parse_host_port(v["listen"] or default_listen(bool(keys)))
    except ValueError as exc:
        raise ConfigError("--listen / MESHLLM_GATEWAY_LISTEN", str(exc)) from exc
    return GatewayConfig(
        etcd_url=v["etcd"], host=host, port=port, blackboard_address=v["blackboard"],
        timing=StreamTiming(v["first_token_timeout_s"], v["token_timeout_s"],
                            v["cold_start_wait_s"], v["stall_probe_s"], v["probe_timeout_s"],
                            v["max_migrations"], v["migrate_wait_s"]),
        log_level=v["log_level"],
        trace=trace_settings("gateway", env), security=security_from(v),
        api_keys=keys, limits=input_limits(v),
        cors_origins=v["cors_origins"], https=https_files(v["https_cert"], v["https_key"]),
        demand=demand_settings(v, port),
    )


def demand_settings(v: dict[str, Any], port: int) -> DemandSettings:
    if v["demand_recent_s"] > v["demand_window_s"]:
        raise ConfigError("--demand-recent-s / MESHLLM_DEMAND_RECENT_S",
                          f"must be at most the window ({v['demand_window_s']:g} s)")
    gateway_id = v["gateway_id"] or f"{socket.gethostname()}-{port}"
    if "/" in gateway_id:
        raise ConfigError("--gateway-id / MESHLLM_GATEWAY_ID", "must not contain '/'")
    return DemandSettings(gateway_id, v["demand_window_s"], v["demand_recent_s"],
                          v["demand_publish_s"])


def https_files(cert: str, key: str) -> HttpsFiles | None:
    """Both files or neither; a pair that does not load (unreadable, not PEM, a key that
    is not the certificate's) fails at start naming the option, not at the first client."""
    if not cert and not key:
        return None
    if not (cert and key):
        missing = "--https-key / MESHLLM_HTTPS_KEY" if cert else "--https-cert / MESHLLM_HTTPS_CERT"
        raise ConfigError(missing, "HTTPS needs both a certificate and its key")
    files = HttpsFiles(Path(cert).expanduser(), Path(key).expanduser())
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(files.cert,
                                                                            files.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("--https-cert / --https-key (MESHLLM_HTTPS_CERT / MESHLLM_HTTPS_KEY)",
                          f"cannot load {files.cert} with {files.key}: {exc}") from exc
    return files


def api_keys(plain: tuple[str, ...], keys_file: str) -> tuple[ApiKey, ...]:
    """The plain keys (hashed here) and the keys file's entries."""
    from_file: tuple[ApiKey, ...] = ()
    if keys_file:
        try:
            text = Path(keys_file).expanduser().read_text()
        except OSError as exc:
            raise ConfigError("--api-keys-file / MESHLLM_API_KEYS_FILE", str(exc)) from exc
        from_file = parse_keys_file(text, keys_file)
    return keys_checked((*plain_keys(plain), *from_file), "--api-key / --api-keys-file")


def input_limits(v: dict[str, Any]) -> InputLimits:
    values = {name: v[opt.dest] for opt, name in LIMIT_OPTIONS}
    if values["max_output_tokens"] < 0:
        raise ConfigError("--max-output-tokens / MESHLLM_MAX_OUTPUT_TOKENS", "must be >= 0")
    for (opt, name) in LIMIT_OPTIONS:
        if name in PARSER_MAXIMA and values[name] > PARSER_MAXIMA[name]:
            raise ConfigError(opt.key, f"at most {PARSER_MAXIMA[name]} (what the request "
                              "parser accepts)")
    return InputLimits(**values)
