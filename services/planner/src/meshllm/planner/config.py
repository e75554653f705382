"""Planner configuration: flags and MESHLLM_* environment variables."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshllm.common.config import (
    ETCD_OPTION,
    LOG_LEVEL_OPTION,
    METRICS_PORT_OPTION,
    Option,
    csv_list,
    listen_option,
    parse_size,
    positive_float,
    positive_int,
    read_options,
)
from meshllm.common.errors import ConfigError
from meshllm.common.telemetry import TraceSettings, trace_settings
from meshllm.common.tls import TLS_OPTIONS, GrpcSecurity, security_from
from meshllm.common.types import CHAT_TEMPLATE_NAMES


@dataclass(frozen=True)
class PlannerConfig:
    etcd_url: str
    listen: str                     # host:port of the Planner gRPC service
    models: tuple[str, ...]         # catalog names or .gguf paths to serve
    split: tuple[str, ...]          # models to split across workers even if one holds them
    max_link_rtt_ms: float          # never split a model over a slower link
    slots: int                      # sequences each engine decodes together, full context each
    speculative: dict[str, str]     # model -> none | ngram | draft:<model>; "*" for all
    chat_templates: dict[str, str]  # model -> name:NAME | text:SOURCE (ModelSpec.chat_template)
    context_length_tokens: int      # context each engine serves, capped at the trained one
    engine_overhead_bytes: int      # memory an engine needs beside weights and KV cache
    max_replicas: int               # 0: as many as fit
    debounce_s: float               # wait this long for membership to settle before planning
    metrics_port: int               # TCP port of the Prometheus endpoint; 0: off
    log_level: str                  # logging level name
    trace: TraceSettings        # what the OTEL_* variables ask for
    security: GrpcSecurity      # plaintext or mutual TLS for the Planner service


OPTIONS = (
    ETCD_OPTION,
    listen_option("MESHLLM_PLANNER_LISTEN", "0.0.0.0:9338", "gRPC"),
    Option("--models", "MESHLLM_MODELS", csv_list, "gemma3-270m",
           "comma-separated model names or .gguf paths"),
    Option("--split", "MESHLLM_SPLIT", csv_list, "",
           "comma-separated models (as given in --models) to split even when they fit"),
    Option("--max-link-rtt-ms", "MESHLLM_MAX_LINK_RTT_MS", positive_float, "80",
           "links slower than this (round trip) are never used to split a model"),
    Option("--slots", "MESHLLM_SLOTS", positive_int, "4",
           "requests each engine decodes at once (continuous batching); KV cache grows with it"),
    Option("--speculative", "MESHLLM_SPECULATIVE", csv_list, "none",
           "speculative decoding: none | ngram | draft:MODEL, for all models or as "
           "MODEL=MODE entries"),
    Option("--chat-template", "MESHLLM_CHAT_TEMPLATE", csv_list, "",
           f"chat template override: {' | '.join(CHAT_TEMPLATE_NAMES)} or a Jinja FILE, "
           "for all models or as MODEL=VALUE entries (default: the GGUF's own, else its "
           "family's)"),
    Option("--context-length", "MESHLLM_CONTEXT_LENGTH", positive_int, "4096",
           "context length in tokens per engine"),
    Option("--engine-overhead", "MESHLLM_ENGINE_OVERHEAD", parse_size, "96MiB",
           "memory an engine needs beside weights and KV cache"),
    Option("--max-replicas", "MESHLLM_MAX_REPLICAS", int, "0", "replicas per model (0: all fit)"),
    Option("--debounce-s", "MESHLLM_PLANNER_DEBOUNCE_S", positive_float, "0.3",
           "seconds to let membership settle before re-planning"),
    METRICS_PORT_OPTION,
    LOG_LEVEL_OPTION,
    *TLS_OPTIONS,
)


def speculative_modes(entries: Sequence[str]) -> dict[str, str]:
    """{"*": "ngram", "gemma3-270m": "draft:small.gguf"} from "ngram,gemma3-270m=draft:..."."""
    modes = {}
    for entry in entries:
        model, _, mode = entry.rpartition("=") if "=" in entry else ("*", "", entry)
        if mode.partition(":")[0] not in ("none", "ngram", "draft") or (
                mode.startswith("draft") and not mode.partition(":")[2]):
            raise ConfigError("--speculative / MESHLLM_SPECULATIVE",
                              f"{entry!r}: expected none, ngram or draft:MODEL")
        modes[model or "*"] = mode
    return modes


def _chat_template(entry: str, value: str, read: Callable[[Path], str]) -> str:
    if value in CHAT_TEMPLATE_NAMES:
        return f"name:{value}"
    try:
        source = read(Path(value).expanduser())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("--chat-template / MESHLLM_CHAT_TEMPLATE",
                          f"{entry!r}: not one of {', '.join(CHAT_TEMPLATE_NAMES)} and not a "
                          f"readable template file ({exc})") from exc
    if not source.strip():
        raise ConfigError("--chat-template / MESHLLM_CHAT_TEMPLATE",
                          f"{entry!r}: the template file is empty")
    return f"text:{source}"


def chat_templates(entries: Sequence[str], read: Callable[[Path], str] = Path.read_text
                   ) -> dict[str, str]:
    """{"*": "name:chatml", "m.gguf": "text:{% for ..."} from "chatml,m.gguf=tpl.jinja":
    a name stays a name; a file is read here, so its text travels and workers need no file."""
    resolved = {}
    for entry in entries:
        model, _, value = entry.rpartition("=") if "=" in entry else ("*", "", entry)
        resolved[model or "*"] = _chat_template(entry, value, read)
    return resolved


def load_config(argv: Sequence[str], env: Mapping[str, str]) -> PlannerConfig:
    v = read_options("mesh-llm planner", OPTIONS, argv, env)
    unknown = set(v["split"]) - set(v["models"])
    if unknown:
        raise ConfigError("--split / MESHLLM_SPLIT",
                          f"{', '.join(sorted(unknown))} not among --models")
    return PlannerConfig(
        etcd_url=v["etcd"], listen=v["listen"], models=v["models"], split=v["split"],
        max_link_rtt_ms=v["max_link_rtt_ms"], slots=v["slots"],
        speculative=speculative_modes(v["speculative"]),
        chat_templates=chat_templates(v["chat_template"]),
        context_length_tokens=v["context_length"], engine_overhead_bytes=v["engine_overhead"],
        max_replicas=v["max_replicas"], debounce_s=v["debounce_s"],
        metrics_port=v["metrics_port"], log_level=v["log_level"],
        trace=trace_settings("planner", env), security=security_from(v),
    )
