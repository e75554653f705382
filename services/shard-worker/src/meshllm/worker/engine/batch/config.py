"""The engine's knobs, fixed at load time."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum

from meshllm.common.errors import ConfigError
from meshllm.worker.engine.batch.backend import ContextSettings
from meshllm.worker.engine.batch.load_options import LoadOptions
from meshllm.worker.engine.batch.numerics import numerics_for
from meshllm.worker.engine_wire import DEFAULT_MAX_QUEUE


class SpecMode(StrEnum):
    NONE = "none"
    DRAFT = "draft"  # a small draft model with the same vocabulary proposes tokens
    NGRAM = "ngram"  # prompt lookup: continue an earlier occurrence of the latest n-gram


@dataclass(frozen=True)
class BatchConfig:
    model_path: str
    n_ctx: int = 4096  # total KV cells; each slot gets n_ctx // n_slots
    n_slots: int = 8
    n_threads: int = 2
    n_batch: int = 512  # most tokens in one llama_decode call
    prefill_chunk: int = 128  # most prompt tokens per step, so running streams keep flowing
    max_queue: int = DEFAULT_MAX_QUEUE  # waiting requests beyond busy slots before QueueFull
    prefix_reuse: bool = True
    kv_unified: bool = False  # as llama-server --parallel N: one KV stream per slot
    # Batch-invariant kernels (batch/numerics): the same request gives the same tokens
    # whatever shares its batch or its cache; needs repacking off and one stream per slot.
    deterministic: bool = True
    spec_mode: SpecMode = SpecMode.NONE
    draft_model_path: str | None = None
    draft_max: int = 4  # most tokens proposed per sequence and step
    # Round trips of one step to a split's stages (0: whole): drafts grow with it
    # (draft_tuning.py), up to draft_max.
    link_rtt_s: float = 0.0
    # Greedy drafts padded towards the longest when that saves ubatches (ubatch.py). Off:
    # a real-model test of it still diverged once (a 36-nat gap), and it measured no faster
    # on loopback or at +20 ms (docs/split-latency.md).
    pad_drafts: bool = False
    ngram_max: int = 3  # longest n-gram looked up in the history
    ngram_min: int = 1
    seed: int | None = None  # default seed of requests without one; None: random
    load: LoadOptions = field(default_factory=LoadOptions)  # how llama.cpp loads the models
    chat_template: str = ""  # override: "" (automatic) | name:NAME | text:SOURCE
    embed_tokens: int = 512  # most tokens in one embedding decode (so in one input)
    embed_seqs: int = 64     # most inputs in one embedding decode
    # An embedding context unused this long is freed: with a large vocabulary it holds a
    # gigabyte (llama.cpp computes logits for every token it embeds); made again on use.
    embed_idle_s: float = 60.0
    # Groups of slots in flight (groups.py): each its own context and thread over the one
    # model, so that one group's round trips to a split's stages overlap the others' work.
    groups: int = 1

    def __post_init__(self) -> None:
        if self.n_slots < 1:
            raise ConfigError("n_slots", "must be at least 1")
        if self.n_ctx // self.n_slots < 16:
            raise ConfigError("n_ctx", f"{self.n_ctx} leaves under 16 tokens per slot")
        if self.prefill_chunk < 1:
            raise ConfigError("prefill_chunk", "must be at least 1")
        if self.n_batch < self.n_slots * (self.draft_max + 1):
            raise ConfigError("n_batch", "must hold one speculative step of every slot")
        if self.max_queue < 0:
            raise ConfigError("max_queue", "must not be negative")
        if self.spec_mode is SpecMode.DRAFT and not self.draft_model_path:
            raise ConfigError("draft_model_path", "speculative mode 'draft' needs a draft model")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError("ngram_min", "must be between 1 and ngram_max")
        if not 1 <= self.groups <= self.n_slots:
            raise ConfigError("groups", f"must be between 1 and n_slots ({self.n_slots})")
        if self.groups > 1 and self.spec_mode is SpecMode.DRAFT:
            raise ConfigError("groups", "a draft model drafts for one context: speculative "
                              "mode 'draft' needs groups 1 (n-gram drafting works with any)")
        if self.deterministic and self.kv_unified:
            # A unified cache interleaves the sequences' cells, so attention sums a
            # sequence's cells in an order that depends on the others.
            raise ConfigError("kv_unified", "deterministic generation needs one KV stream "
                              "per slot: turn kv_unified or deterministic off")

    @property
    def model_load(self) -> LoadOptions:
        """How to load the models: repacked weights run other kernels per batch size, so
        deterministic generation loads without repacking whatever `load` says."""
        return dataclasses.replace(self.load, repack=False) if self.deterministic else self.load

    def context(self, n_batch: int) -> ContextSettings:
        """The llama.cpp context of the target (and of a draft model) for this config."""
        return ContextSettings(self.n_ctx, self.n_slots, self.n_threads, n_batch,
                               self.kv_unified, numerics_for(self.deterministic))

    def group_config(self, n_slots: int) -> BatchConfig:
        """The config of one group of `n_slots` slots: each slot keeps its context."""
        return dataclasses.replace(self, n_slots=n_slots, n_ctx=n_slots * self.n_ctx_slot,
                                   groups=1)

    @property
    def n_ctx_slot(self) -> int:
        return self.n_ctx // self.n_slots

    @property
    def speculative(self) -> bool:
        return self.spec_mode is not SpecMode.NONE and self.draft_max > 0
