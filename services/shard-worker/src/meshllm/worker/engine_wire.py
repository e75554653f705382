"""The engine process's wire: the commands the worker sends its engine child (on the
child's stdin) and the events the child sends back (on its stdout), one JSON object a line.

Both sides import this module and nothing else knows the format: `encode` writes any
message, `decode_command` / `decode_event` read one line and check every field, and refuse
anything else with `MalformedEngineMessage`. Errors cross as their reason code, message and
`wire_details()`; `WireError.rebuild()` gives the receiver the same typed error. Each
default of the engine's settings is declared here once.

Nothing here imports llama.cpp: the worker service imports this module too.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TypeVar

from meshllm.common import errors
from meshllm.common.errors import EngineUnavailable, MeshError
from meshllm.common.types import (
    ChatMessage,
    EmbedInput,
    EmbedRequest,
    GenerateRequest,
    Grammar,
    GrammarKind,
    RequestId,
    Resume,
    SamplingParams,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)
from meshllm.worker.wire_fields import Fields, decoded
from meshllm.worker.wire_fields import MalformedEngineMessage as MalformedEngineMessage

DEFAULT_SLOTS = 1                # requests decoded together
DEFAULT_MAX_QUEUE = 16           # requests waiting for a free slot before the engine is busy
DEFAULT_SPECULATIVE = "none"     # auto | none | ngram | draft:<path of the draft model>
DEFAULT_RPC_LIBRARY = "meshllm"  # meshllm | stock: the ggml-rpc build heads and stages use
DEFAULT_WEIGHT_REPACK = False    # llama.cpp's CPU weight repacking: see batch/load_options
DEFAULT_LOG_LEVEL = "INFO"       # the engine child's log level

T = TypeVar("T")


# --- commands: worker -> engine -----------------------------------------------------


@dataclass(frozen=True)
class Load:
    """The first command: the model and how to run it (the engine's settings)."""

    model_path: Path
    context_length_tokens: int           # per slot
    threads: int
    rpc_endpoints: tuple[str, ...] = ()  # stages of a split, in layer order
    stage_layers: tuple[int, ...] = ()   # layers on each stage (the model's last ones)
    weight_repack: bool = DEFAULT_WEIGHT_REPACK
    slots: int = DEFAULT_SLOTS
    max_queue: int = DEFAULT_MAX_QUEUE
    speculative: str = DEFAULT_SPECULATIVE
    rpc_library: str = DEFAULT_RPC_LIBRARY
    chat_template: str = ""              # ModelSpec.chat_template: "" | name:NAME | text:SOURCE
    deterministic: bool = True           # ModelSpec.deterministic: batch-invariant kernels
    link_rtt_s: float = 0.0              # a step's round trips to the stages (links.py)


@dataclass(frozen=True)
class Generate:
    request_id: RequestId
    text: str | None
    chat: tuple[ChatMessage, ...] | None
    sampling: SamplingParams
    grammar: Grammar | None = None
    logprobs: int | None = None
    tools_json: str = ""
    resume: Resume | None = None

    @classmethod
    def of(cls, request: GenerateRequest) -> Generate:
        return cls(request.request_id, request.text, request.chat, request.sampling,
                   request.grammar, request.logprobs, request.tools_json, request.resume)


@dataclass(frozen=True)
class Cancel:
    request_id: RequestId


@dataclass(frozen=True)
class Embed:
    """Inputs to embed together: texts (tokenized by the engine) or token id lists."""

    request_id: RequestId
    inputs: tuple[EmbedInput, ...]

    @classmethod
    def of(cls, request: EmbedRequest) -> Embed:
        return cls(request.request_id, request.inputs)


@dataclass(frozen=True)
class SetLinkRtt:
    """A split's links changed: the round trips one step now waits (links.py
    step_round_trip_s), for the draft tuner; sent any time after Loaded."""

    rtt_s: float


Command = Load | Generate | Cancel | Embed | SetLinkRtt


# --- events: engine -> worker -------------------------------------------------------


@dataclass(frozen=True)
class WireError:
    """An error as it crosses: its reason code, message and structured details."""

    reason: str
    message: str
    details: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, exc: BaseException) -> WireError:
        """Mesh errors cross as themselves, anything else as the engine being unavailable."""
        error = exc if isinstance(exc, MeshError) else EngineUnavailable(
            f"{type(exc).__name__}: {exc}")
        return cls(error.reason, str(error), dict(error.wire_details()))

    def rebuild(self) -> MeshError:
        """The typed error; a reason this side does not know is the engine unavailable."""
        error = errors.rebuild(self.reason, self.message, self.details)
        if type(error) is MeshError:
            return EngineUnavailable(f"{self.reason}: {self.message}")
        return error


@dataclass(frozen=True)
class EngineStats:
    """The engine's counters (zeros until its first report)."""

    running: int = 0
    queued: int = 0
    max_queue: int = 0
    n_slots: int = 0
    steps: int = 0  # llama_decode calls on the target model
    seq_steps: int = 0  # (sequence, decode call) pairs that produced tokens
    generated_tokens: int = 0
    prompt_tokens_processed: int = 0
    prompt_tokens_cached: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    link_rtt_us: int = 0  # the round trip of a step that the draft tuner assumes now

    @property
    def tokens_per_step(self) -> float:
        """Tokens emitted per sequence per target decode: 1.0 without speculation."""
        return self.generated_tokens / self.seq_steps if self.seq_steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


@dataclass(frozen=True)
class Progress:
    fraction: float  # of the weights loaded, 0..1


@dataclass(frozen=True)
class Loaded:
    n_ctx: int  # context tokens per slot


@dataclass(frozen=True)
class LoadFailed:
    error: WireError


@dataclass(frozen=True)
class Delta:
    request_id: RequestId
    text: str
    tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens whose text this delta sends
    sent_ids: tuple[int, ...] = ()  # tokens whose text started to be sent with this delta
    draws: int = 0                  # the seeded generator's draws once the last was chosen


@dataclass(frozen=True)
class Finished:
    request_id: RequestId
    finish_reason: str
    usage: Usage
    started_ns: int      # when the engine took the request (unix ns)
    first_token_ns: int  # when its first token came (0: none)


@dataclass(frozen=True)
class Embedded:
    """An Embed command's answer: one vector per input, each its float32 values in
    little-endian bytes (a tenth of the pipe's bytes as JSON numbers would take)."""

    request_id: RequestId
    vectors: tuple[bytes, ...]
    prompt_tokens: int


@dataclass(frozen=True)
class Error:
    request_id: RequestId
    error: WireError


@dataclass(frozen=True)
class Stats:
    stats: EngineStats


Event = Progress | Loaded | LoadFailed | Delta | Finished | Embedded | Error | Stats

_TAGS: dict[type, tuple[str, str]] = {
    Load: ("op", "load"), Generate: ("op", "generate"), Cancel: ("op", "cancel"),
    Embed: ("op", "embed"), SetLinkRtt: ("op", "link_rtt"), Embedded: ("ev", "embedded"),
    Progress: ("ev", "progress"), Loaded: ("ev", "loaded"), LoadFailed: ("ev", "load_failed"),
    Delta: ("ev", "delta"), Finished: ("ev", "finished"), Error: ("ev", "error"),
    Stats: ("ev", "stats"),
}


def _plain(value: object) -> object:
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bytes):  # a token's exact bytes, which need not be UTF-8
        return value.hex()
    raise TypeError(f"{type(value).__name__} does not cross the engine pipe")


def encode(message: Command | Event) -> bytes:
    """One message as one JSON line."""
    key, tag = _TAGS[type(message)]
    body = {key: tag, **dataclasses.asdict(message)}
    return (json.dumps(body, ensure_ascii=False, default=_plain) + "\n").encode()


# --- decoding -----------------------------------------------------------------------



def _load(f: Fields) -> Load:
    return Load(Path(f.text("model_path")), f.integer("context_length_tokens"),
                f.integer("threads"), f.texts("rpc_endpoints"), f.integers("stage_layers"),
                f.flag("weight_repack"), f.integer("slots"), f.integer("max_queue"),
                f.text("speculative"), f.text("rpc_library"), f.text("chat_template"),
                f.flag("deterministic"), f.number("link_rtt_s"))


def _sampling(f: Fields) -> SamplingParams:
    return SamplingParams(
        max_tokens=f.integer("max_tokens"), temperature=f.number("temperature"),
        top_p=f.number("top_p"), seed=f.optional_integer("seed"), stop=f.texts("stop"),
        top_k=f.integer("top_k"), presence_penalty=f.number("presence_penalty"),
        frequency_penalty=f.number("frequency_penalty"),
        repeat_penalty=f.number("repeat_penalty"), min_p=f.number("min_p"),
        logit_bias=f.token_biases("logit_bias"))


def _chat_message(m: Fields) -> ChatMessage:
    calls = m.objects("tool_calls", lambda c: ToolCall(c.text("call_id"), c.text("name"),
                                                       c.text("arguments")))
    return ChatMessage(m.text("role"), m.text("content"), calls, m.text("tool_call_id"),
                       m.text("name"))


def _generate(f: Fields) -> Generate:
    return Generate(RequestId(f.text("request_id")), f.optional_text("text"),
                    f.optional_list("chat", _chat_message), f.nested("sampling", _sampling),
                    f.optional_nested("grammar", lambda g: Grammar(
                        g.choice("kind", GrammarKind), g.text("source"))),
                    f.optional_integer("logprobs"), f.text("tools_json"),
                    f.optional_nested("resume", lambda r: Resume(
                        r.integers("token_ids"), r.integer("draws"), r.integer("migrations"))))


def _top_logprob(f: Fields) -> TopLogprob:
    return TopLogprob(f.text("token"), f.hex_bytes("token_bytes"), f.number("logprob"))


def _token_logprob(f: Fields) -> TokenLogprob:
    return TokenLogprob(f.text("token"), f.hex_bytes("token_bytes"), f.number("logprob"),
                        f.objects("top", _top_logprob))


def _delta(f: Fields) -> Delta:
    return Delta(RequestId(f.text("request_id")), f.text("text"), f.integer("tokens"),
                 f.objects("logprobs", _token_logprob), f.integers("sent_ids"),
                 f.integer("draws"))


def _error(f: Fields) -> WireError:
    return WireError(f.text("reason"), f.text("message"), f.text_map("details"))


def _usage(f: Fields) -> Usage:
    return Usage(f.integer("prompt_tokens"), f.integer("completion_tokens"),
                 f.integer("cached_tokens"))


def _stats(f: Fields) -> EngineStats:
    return EngineStats(**{s.name: f.integer(s.name) for s in dataclasses.fields(EngineStats)})


def _finished(f: Fields) -> Finished:
    return Finished(RequestId(f.text("request_id")), f.text("finish_reason"),
                    f.nested("usage", _usage), f.integer("started_ns"),
                    f.integer("first_token_ns"))


_COMMANDS: dict[str, Callable[[Fields], Command]] = {
    "load": _load, "generate": _generate,
    "cancel": lambda f: Cancel(RequestId(f.text("request_id"))),
    "embed": lambda f: Embed(RequestId(f.text("request_id")), f.texts_or_token_lists("inputs")),
    "link_rtt": lambda f: SetLinkRtt(f.number("rtt_s")),
}
_EVENTS: dict[str, Callable[[Fields], Event]] = {
    "progress": lambda f: Progress(f.number("fraction")),
    "loaded": lambda f: Loaded(f.integer("n_ctx")),
    "load_failed": lambda f: LoadFailed(f.nested("error", _error)),
    "delta": _delta,
    "finished": _finished,
    "embedded": lambda f: Embedded(RequestId(f.text("request_id")), f.hex_list("vectors"),
                                   f.integer("prompt_tokens")),
    "error": lambda f: Error(RequestId(f.text("request_id")), f.nested("error", _error)),
    "stats": lambda f: Stats(f.nested("stats", _stats)),
}


def _decode(line: bytes | str, key: str, decoders: Mapping[str, Callable[[Fields], T]]) -> T:
    try:
        obj = json.loads(line)
    except ValueError as exc:  # also bytes that are not UTF-8
        raise MalformedEngineMessage(f"not a JSON line ({exc}): {line!r:.80}") from exc
    tag = Fields(obj, "message").text(key)
    decoder = decoders.get(tag)
    if decoder is None:
        raise MalformedEngineMessage(f"unknown {key} {tag!r}")

    def tagged(fields: Fields) -> T:
        fields.text(key)  # read above
        return decoder(fields)

    return decoded(obj, tag, tagged)


def decode_command(line: bytes | str) -> Command:
    """The command on one line from the worker."""
    return _decode(line, "op", _COMMANDS)


def decode_event(line: bytes | str) -> Event:
    """The event on one line from the engine."""
    return _decode(line, "ev", _EVENTS)
