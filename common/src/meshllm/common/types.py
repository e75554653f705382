"""Domain types: one frozen dataclass per wire concept.

Services pass these around; only `convert` knows the protobuf messages they map to.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NewType

from meshllm.common.moe import ExpertSelection, MoeLayout

WorkerId = NewType("WorkerId", str)
ModelId = NewType("ModelId", str)
RequestId = NewType("RequestId", str)


class LoadState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class ModelState:
    model_id: ModelId
    state: LoadState
    error: str = ""
    engine_restarts: int = 0
    rpc_port: int = 0  # a stage's RPC server port when it accepts direct connections
    phase: str = ""    # while loading: assembling the file, loading weights, waiting...
    progress: float = 0.0  # 0..1 through the phase, when known
    draining: bool = False  # retiring: serves the streams it has, takes no new ones
    running: int = 0        # sequences in its slots now
    queued: int = 0         # requests waiting for a slot now
    slots: int = 0          # sequences it generates at once (0: not reported)


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: WorkerId
    address: str
    backend: str
    memory_budget_bytes: int
    threads: int
    started_at_unix_s: float
    models: tuple[ModelState, ...] = ()
    rtt_ms: Mapping[str, float] = field(default_factory=dict)  # peer worker id -> round trip
    rpc_host: str = ""  # set when the worker accepts direct ggml RPC from other workers
    # What it can send a peer lacking a MoE model's file (ShardWorker.FetchShard): the sha256
    # of the MoE model files it can read, and the names of the expert shards it has cached.
    model_files: tuple[str, ...] = ()
    expert_shards: tuple[str, ...] = ()

    def model_state(self, model_id: ModelId) -> ModelState | None:
        return next((m for m in self.models if m.model_id == model_id), None)


# Bytes of 32 K or V values in the two KV cache types the engine uses.
KV_F16_BLOCK_BYTES, KV_Q8_0_BLOCK_BYTES = 64, 34

# The built-in chat templates `--chat-template` may name (the worker's chat.NAMED_TEMPLATES).
CHAT_TEMPLATE_NAMES = ("gemma", "chatml")


@dataclass(frozen=True)
class ModelSpec:
    model_id: ModelId
    source: str
    weights_bytes: int
    n_layers: int
    context_length: int
    kv_bytes_per_token: int              # K and V of one token in every layer, at f16
    architecture: str
    train_context_length: int
    shared_bytes: int = 0                # weights outside the layers (embeddings, output)
    layer_bytes: tuple[int, ...] = ()    # weights of each layer
    force_split: bool = False            # split even when one worker could hold it
    slots: int = 1                       # sequences an engine runs at once, each with
                                         # the full context
    speculative: str = "none"            # auto | none | ngram | draft:<model source>
    chat_template: str = ""              # "": automatic (the GGUF's own, else its family's);
                                         # "name:NAME": a built-in (CHAT_TEMPLATE_NAMES);
                                         # "text:SOURCE": a Jinja template's text
    deterministic: bool = True           # batch-invariant kernels: the same request gives
                                         # the same tokens whatever shares its batch
    moe: MoeLayout | None = None         # a mixture of experts: its experts and their bytes
    model_digest: str = ""               # sha256 (hex) of the file; read for MoE models only

    @property
    def kv_slot_bytes(self) -> int:
        """The KV cache of one slot (one full context) in the cache type the engine uses:
        a deterministic engine keeps K and V in q8_0 (34 bytes per 32 values, the worker's
        numerics.REPRODUCIBLE), a fast one in f16 (64), as kv_bytes_per_token counts."""
        f16 = self.kv_bytes_per_token * self.context_length
        return f16 * KV_Q8_0_BLOCK_BYTES // KV_F16_BLOCK_BYTES if self.deterministic else f16

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_slot_bytes * max(1, self.slots)

    def layer_weight_bytes(self, start: int, end: int) -> int:
        """Weights of layers [start, end); an even share when per-layer sizes are unknown."""
        if len(self.layer_bytes) == self.n_layers:
            return sum(self.layer_bytes[start:end])
        return (self.weights_bytes - self.shared_bytes) * (end - start) // self.n_layers

    def layer_kv_bytes(self, n_layers: int) -> int:
        return self.kv_cache_bytes * n_layers // self.n_layers


@dataclass(frozen=True)
class ModelDeclaration:
    """A model the mesh is asked to serve: declared at start (--models) or at run time
    (POST /api/models). The planner describes it (a ModelSpec) and places it."""

    model_id: ModelId      # models.model_id_for(source): one declaration per id
    source: str            # catalog name or path to a .gguf file
    min_replicas: int = 0  # kept whatever the demand
    max_replicas: int = 0  # 0: as many as fit
    priority: int = 0      # higher is served first
    at_start: bool = False  # declared by the planner's --models (False: at run time)


@dataclass(frozen=True)
class Assignment:
    """One worker's share of a model: layers [layer_start, layer_end)."""

    worker_id: WorkerId
    layer_start: int
    layer_end: int


@dataclass(frozen=True)
class Replica:
    """One copy of a model: stages[0] is the head (embeddings, output, request loop);
    later stages hold the layers after it, in order."""

    stages: tuple[Assignment, ...]
    retiring: bool = False  # takes no new requests; its workers drain it, then unload it
    experts: ExpertSelection = ()  # an expert shard: the experts it holds per MoE layer
                                   # (): the model's own experts, all of them

    @property
    def head(self) -> Assignment:
        return self.stages[0]

    @property
    def is_split(self) -> bool:
        return len(self.stages) > 1

    @property
    def is_shard(self) -> bool:
        return bool(self.experts)

    @property
    def worker_ids(self) -> tuple[WorkerId, ...]:
        return tuple(a.worker_id for a in self.stages)


def whole(worker_id: WorkerId, n_layers: int) -> Replica:
    return Replica((Assignment(worker_id, 0, n_layers),))


@dataclass(frozen=True)
class ExpertDeal:
    """How a mixture-of-experts model's experts were dealt to its shards."""

    hot_share: float             # share of each shard's experts that every shard holds
    calibration_tokens: int = 0  # the ranking's tokens; 0: no calibration, an even deal
    why: str = ""                # why expert shards and not whole or a layer split


@dataclass(frozen=True)
class Placement:
    model_id: ModelId
    replicas: tuple[Replica, ...]
    required_bytes: int
    unplaced_reason: str = ""
    expert_deal: ExpertDeal | None = None  # its replicas are expert shards

    @property
    def worker_ids(self) -> tuple[WorkerId, ...]:
        """Every worker that holds part of the model."""
        return tuple(w for r in self.replicas for w in r.worker_ids)

    @property
    def head_ids(self) -> tuple[WorkerId, ...]:
        """The workers requests are sent to."""
        return tuple(r.head.worker_id for r in self.replicas)


@dataclass(frozen=True)
class ToolCall:
    """A function call the assistant made: `arguments` is the JSON text it wrote."""

    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatMessage:
    role: str                              # system | user | assistant | tool
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn that called tools
    tool_call_id: str = ""                 # a tool turn: the call it answers
    name: str = ""                         # a tool turn: the function's name, when known


class GrammarKind(enum.Enum):
    JSON_SCHEMA = "json_schema"  # source: a JSON schema, as JSON text
    LARK = "lark"                # source: a grammar in llguidance's Lark dialect


@dataclass(frozen=True)
class Grammar:
    """A constraint on the generated text, enforced token by token by the engine."""

    kind: GrammarKind
    source: str


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 0  # 0: until the context is full
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids ascending


@dataclass(frozen=True)
class Resume:
    """Where an interrupted generation stands, for another replica to carry it on: the
    tokens the client has (some of each one's text was sent) and how many uniform numbers
    the request's seeded generator had drawn when the last of them was chosen."""

    token_ids: tuple[int, ...]
    draws: int = 0
    migrations: int = 1  # times the request has moved, this one included


@dataclass(frozen=True)
class GenerateRequest:
    request_id: RequestId
    model_id: ModelId
    text: str | None = None
    chat: tuple[ChatMessage, ...] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    grammar: Grammar | None = None  # the output must match it
    logprobs: int | None = None     # None: no logprobs; n: each token's and its top n
    tools_json: str = ""            # chat: the request's `tools` list as JSON, for the prompt
    resume: Resume | None = None    # carry on an interrupted generation (a migration)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TopLogprob:
    token: str          # the token's text (a piece of a character shows as its bytes)
    token_bytes: bytes  # the token's exact bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log probability and the most likely alternatives,
    from the distribution it was chosen from (see the README's logprobs section)."""

    token: str
    token_bytes: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()  # most likely first


@dataclass(frozen=True)
class TokenDelta:
    text: str
    tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when the request asked
    # The tokens whose text started to be sent with this delta, and the generator's draws
    # once the last of them was chosen: what a Resume needs (the gateway keeps them).
    sent_ids: tuple[int, ...] = ()
    draws: int = 0


@dataclass(frozen=True)
class Finished:
    finish_reason: str
    usage: Usage
    queued_s: float = 0.0   # waited in the worker for a slot (seconds)
    service_s: float = 0.0  # in a slot, prefill to last token (seconds)


GenerateEvent = TokenDelta | Finished


@dataclass(frozen=True)
class WorkerStats:
    worker_id: WorkerId
    running_requests: int
    queued_requests: int
    generated_tokens_total: int
    prompt_tokens_total: int
    models: tuple[ModelState, ...] = ()


# An input to embed: text (tokenized by the worker) or token ids (used as given).
EmbedInput = str | tuple[int, ...]


@dataclass(frozen=True)
class EmbedRequest:
    request_id: RequestId
    model_id: ModelId
    inputs: tuple[EmbedInput, ...]


@dataclass(frozen=True)
class Embeddings:
    """One vector per input, in order: mean-pooled over the input's tokens, L2-normalised,
    float32 values."""

    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int  # tokens embedded, over every input
