"""Planner configuration: flags and MESHLLM_* environment variables."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshllm.common.config import (
    ETCD_OPTION,
    LOG_LEVEL_OPTION,
    METRICS_PORT_OPTION,
    Option,
    csv_list,
    listen_option,
    non_negative_float,
    on_off,
    parse_size,
    positive_float,
    positive_int,
    read_options,
)
from meshllm.common.errors import ConfigError
from meshllm.common.telemetry import TraceSettings, trace_settings
from meshllm.common.tls import TLS_OPTIONS, GrpcSecurity, security_from
from meshllm.common.types import CHAT_TEMPLATE_NAMES
from meshllm.planner.demand import RebalancePolicy
from meshllm.planner.suspects import SuspectPolicy


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise ValueError(f"must be between 0 and 1, got {value}")
    return value


def share(text: str) -> float:
    """0..1, both included: 1 (the default hot share) asks for as many as there is room for."""
    value = float(text)
    if not 0 <= value <= 1:
        raise ValueError(f"must be from 0 to 1, got {value}")
    return value


def rebalance_policy(v: Mapping[str, Any]) -> RebalancePolicy:
    """The rebalance knobs; thresholds out of order fail naming the three options."""
    try:
        return RebalancePolicy(
            add_above=v["add_above"], target=v["target_utilization"],
            retire_below=v["retire_below"], max_queue_wait_s=v["max_queue_wait_s"],
            min_requests=v["min_requests"], min_window_s=v["min_window_s"],
            idle_to_zero_s=v["idle_to_zero_s"], min_age_s=v["min_age_s"],
            cooldown_s=v["cooldown_s"], retire_cold_early=v["retire_cold_early"])
    except ConfigError as exc:
        raise ConfigError("--retire-below < --target-utilization < --add-above",
                          str(exc).partition(": ")[2]) from exc


@dataclass(frozen=True)
class PlannerConfig:
    etcd_url: str
    listen: str                     # host:port of the Planner gRPC service
    models: tuple[str, ...]         # catalog names or .gguf paths to serve
    split: tuple[str, ...]          # models to split across workers even if one holds them
    max_link_rtt_ms: float          # never split a model over a slower link
    slots: int                      # sequences each engine decodes together, full context
                                    # each (fewer where the model would not fit: place.py)
    speculative: dict[str, str]     # model -> auto | none | ngram | draft:<model>; "*": all
    deterministic: dict[str, bool]  # model -> reproducible generation (batch-invariant
                                    # kernels); "*" for all
    chat_templates: dict[str, str]  # model -> name:NAME | text:SOURCE (ModelSpec.chat_template)
    context_length_tokens: int      # context each engine serves, capped at the trained one
    engine_overhead_bytes: int      # memory an engine needs beside weights and KV cache
    max_replicas: int               # 0: as many as fit
    expert_hot_share: float         # fraction (0..1) of an expert shard's experts that are
                                    # the most chosen ones, held by every shard
    debounce_s: float               # wait this long for membership to settle before planning
    interval_s: float               # plan a round at least this often (seconds)
    suspects: SuspectPolicy         # probing workers reported unreachable (planner/suspects.py)
    fill_free_memory: bool          # free memory holds replicas until a model needs it
    rebalance: RebalancePolicy      # when capacity follows demand (see rebalance.py)
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
    Option("--slots", "MESHLLM_SLOTS", positive_int, "8",
           "requests each engine decodes at once (continuous batching), one context of KV "
           "cache each; fewer (down to 1) where a model with that many fits no worker"),
    Option("--speculative", "MESHLLM_SPECULATIVE", csv_list, "auto",
           "speculative decoding: auto (n-gram on the head of a split, where every step "
           "waits on the stages; none on a model served whole) | none | ngram | "
           "draft:MODEL, for all models or as MODEL=MODE entries"),
    Option("--deterministic", "MESHLLM_DETERMINISTIC", csv_list, "on",
           "reproducible generation (the same request gives the same tokens whatever shares "
           "its batch; README: 'Same request, same answer'): on | off, for all models or as "
           "MODEL=on|off entries"),
    Option("--chat-template", "MESHLLM_CHAT_TEMPLATE", csv_list, "",
           f"chat template override: {' | '.join(CHAT_TEMPLATE_NAMES)} or a Jinja FILE, "
           "for all models or as MODEL=VALUE entries (default: the GGUF's own, else its "
           "family's)"),
    Option("--context-length", "MESHLLM_CONTEXT_LENGTH", positive_int, "4096",
           "context length in tokens per engine"),
    Option("--engine-overhead", "MESHLLM_ENGINE_OVERHEAD", parse_size, "96MiB",
           "memory an engine needs beside weights and KV cache"),
    Option("--max-replicas", "MESHLLM_MAX_REPLICAS", int, "0", "replicas per model (0: all fit)"),
    Option("--expert-hot-share", "MESHLLM_EXPERT_HOT_SHARE", share, "1",
           "fraction (0..1) of each expert shard's experts that are the most chosen ones "
           "(by calibration), held by every shard of a mixture-of-experts model, as far as "
           "keeping every expert on 1 shard (2 from 3 shards) leaves room"),
    Option("--debounce-s", "MESHLLM_PLANNER_DEBOUNCE_S", positive_float, "0.3",
           "seconds to let membership settle before re-planning"),
    Option("--suspect-probe-timeout-s", "MESHLLM_SUSPECT_PROBE_TIMEOUT_S", positive_float, "1",
           "seconds a worker reported unreachable has to answer a health check before "
           "the planner plans around it"),
    Option("--suspect-reprobe-s", "MESHLLM_SUSPECT_REPROBE_S", positive_float, "2",
           "seconds between health checks of a worker still reported unreachable"),
    Option("--rebalance-interval-s", "MESHLLM_REBALANCE_INTERVAL_S", positive_float, "5",
           "seconds between planning rounds when nothing changes"),
    Option("--fill-free-memory", "MESHLLM_FILL_FREE_MEMORY", on_off, "on",
           "on: memory nobody needs holds more replicas (taken back when a model needs it); "
           "off: models get replicas by demand and min_replicas only", switch=True),
    Option("--add-above", "MESHLLM_REBALANCE_ADD_ABOVE", fraction, "0.8",
           "a model whose slots are busier than this (0-1) gets replicas"),
    Option("--target-utilization", "MESHLLM_REBALANCE_TARGET", fraction, "0.6",
           "utilization (0-1) a model is sized to when it grows or shrinks"),
    Option("--retire-below", "MESHLLM_REBALANCE_RETIRE_BELOW", fraction, "0.25",
           "utilization (0-1) under which a model may lose replicas"),
    Option("--max-queue-wait-s", "MESHLLM_REBALANCE_MAX_QUEUE_WAIT_S", positive_float, "2",
           "a mean wait for a slot over this (seconds) counts as hot"),
    Option("--min-requests", "MESHLLM_REBALANCE_MIN_REQUESTS", positive_float, "10",
           "requests in the demand window before a model counts as hot"),
    Option("--min-window-s", "MESHLLM_REBALANCE_MIN_WINDOW_S", positive_float, "30",
           "demand measured over less than this (seconds) retires nothing"),
    Option("--min-age-s", "MESHLLM_REBALANCE_MIN_AGE_S", non_negative_float, "300",
           "seconds a replica stays before it may retire or be taken for another model"),
    Option("--cooldown-s", "MESHLLM_REBALANCE_COOLDOWN_S", non_negative_float, "120",
           "seconds after a model grew before it may shrink, or the reverse"),
    Option("--idle-to-zero-s", "MESHLLM_REBALANCE_IDLE_TO_ZERO_S", positive_float, "600",
           "with --retire-cold-early: seconds without a request before a model goes to "
           "zero replicas"),
    Option("--retire-cold-early", "MESHLLM_REBALANCE_RETIRE_COLD_EARLY", on_off, "off",
           "on: a cold model's surplus replicas retire at once; off: they stay loaded "
           "until another model needs the memory", switch=True),
    METRICS_PORT_OPTION,
    LOG_LEVEL_OPTION,
    *TLS_OPTIONS,
)


def speculative_modes(entries: Sequence[str]) -> dict[str, str]:
    """{"*": "ngram", "gemma3-270m": "draft:small.gguf"} from "ngram,gemma3-270m=draft:..."."""
    modes = {}
    for entry in entries:
        model, _, mode = entry.rpartition("=") if "=" in entry else ("*", "", entry)
        kind, colon, draft = mode.partition(":")
        if not (mode in ("auto", "none", "ngram") or (kind == "draft" and colon and draft)):
            raise ConfigError("--speculative / MESHLLM_SPECULATIVE",
                              f"{entry!r}: expected auto, none, ngram or draft:MODEL")
        modes[model or "*"] = mode
    return modes


def deterministic_modes(entries: Sequence[str]) -> dict[str, bool]:
    """{"*": True, "big-model": False} from "on,big-model=off"."""
    modes = {}
    for entry in entries:
        model, _, value = entry.rpartition("=") if "=" in entry else ("*", "", entry)
        if value not in ("on", "off"):
            raise ConfigError("--deterministic / MESHLLM_DETERMINISTIC",
                              f"{entry!r}: expected on, off or MODEL=on|off")
        modes[model or "*"] = value == "on"
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
        deterministic=deterministic_modes(v["deterministic"]),
        chat_templates=chat_templates(v["chat_template"]),
        context_length_tokens=v["context_length"], engine_overhead_bytes=v["engine_overhead"],
        max_replicas=v["max_replicas"], expert_hot_share=v["expert_hot_share"],
        debounce_s=v["debounce_s"],
        suspects=SuspectPolicy(v["suspect_probe_timeout_s"], v["suspect_reprobe_s"]),
        interval_s=v["rebalance_interval_s"], fill_free_memory=v["fill_free_memory"],
        rebalance=rebalance_policy(v),
        metrics_port=v["metrics_port"], log_level=v["log_level"],
        trace=trace_settings("planner", env), security=security_from(v),
    )
