"""Embeddings on the engine's already-loaded model (issue 13).

A second llama.cpp context on the same weights, with embeddings on and MEAN pooling (a
causal LM such as gemma3-270m declares no pooling in its GGUF, so it is set here), made on
the first embedding request: the generation context and its KV cache are never touched.
Inputs are packed several sequences to one llama_decode, up to the context's token and
sequence limits; a longer list is split into chunks, one chunk per engine step, so that
running generation streams wait at most one bounded decode between their tokens: while
streams run, a chunk holds at most a prefill chunk's tokens (unless one input alone is
longer), as much as a step gives a new prompt.

Mean pooling needs each input whole in one micro-batch, so an input may be at most
BatchConfig.embed_tokens long (llama-server's default physical batch, and its limit too).
Vectors are L2-normalised, as llama-server and OpenAI return them, and cross as float32
little-endian bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from meshllm.common.errors import InvalidGenerateRequest, MeshError
from meshllm.worker.engine.batch.errors import DecodeFailed, ModelLoadFailed


class Embedder(Protocol):
    max_tokens: int  # per decode, and so per input
    max_seqs: int    # inputs per decode

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[bytes]:
        """One decode: each input's normalised vector as float32 little-endian bytes."""
        ...

    def close(self) -> None:
        """Frees the context (the engine makes a new one when embeddings are asked again)."""
        ...


def normalised(vector: np.ndarray) -> bytes:
    """The vector scaled to unit length (a zero vector stays zero), as float32 LE bytes."""
    v = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    return (v / norm if norm > 0 else v).astype("<f4").tobytes()


def next_chunk(lengths: Sequence[int], start: int, max_tokens: int, max_seqs: int) -> range:
    """The inputs from `start` on that one decode takes: as many as fit in `max_tokens`
    and `max_seqs`, and at least one (each input fits the context alone: checked when the
    request came in)."""
    end, tokens = start, 0
    while end < len(lengths) and end - start < max_seqs:
        if end > start and tokens + lengths[end] > max_tokens:
            break
        tokens += lengths[end]
        end += 1
    return range(start, end)


def check_inputs(inputs: Sequence[Sequence[int]], n_vocab: int, max_tokens: int) -> None:
    """Refuses, naming the input, an empty one, a token id outside the vocabulary or an
    input longer than one embedding decode."""
    for i, tokens in enumerate(inputs):
        if not tokens:
            raise InvalidGenerateRequest(f"input {i} has no tokens", "input")
        bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise InvalidGenerateRequest(
                f"input {i}: token id {bad} is outside the model's vocabulary "
                f"(0..{n_vocab - 1})", "input")
        if len(tokens) > max_tokens:
            raise InvalidGenerateRequest(
                f"input {i} is {len(tokens)} tokens; this model embeds at most {max_tokens}"
                " tokens per input: split it", "input")


@dataclass(frozen=True)
class EmbedResult:
    vectors: tuple[bytes, ...]  # one per input, in order
    prompt_tokens: int          # over every input


# Called once per request, on the engine thread: its vectors, or why it failed.
OnEmbedded = Callable[[EmbedResult | MeshError], None]


@dataclass
class EmbedJob:
    """One embedding request going through the engine, a chunk per step."""

    request_id: str
    inputs: tuple[tuple[int, ...], ...]
    on_done: OnEmbedded
    vectors: list[bytes] = field(default_factory=list)

    def run_chunk(self, embedder: Embedder, max_tokens: int) -> EmbedResult | None:
        """Embeds the next inputs, at most `max_tokens` of them unless one alone is longer;
        the result once every input has its vector."""
        lengths = [len(t) for t in self.inputs]
        chunk = next_chunk(lengths, len(self.vectors), min(max_tokens, embedder.max_tokens),
                           embedder.max_seqs)
        self.vectors.extend(embedder.embed([self.inputs[i] for i in chunk]))
        if len(self.vectors) < len(self.inputs):
            return None
        return EmbedResult(tuple(self.vectors), sum(lengths))


class LlamaEmbedder:
    """The embedding context on a loaded llama.cpp model; its KV is cleared every decode."""

    def __init__(self, lib: Any, model: Any, n_threads: int, max_tokens: int,
                 max_seqs: int) -> None:
        self._l = lib
        p = lib.llama_context_default_params()
        # One unified KV stream: the chunk's sequences share max_tokens cells.
        p.n_ctx = p.n_batch = p.n_ubatch = max_tokens
        p.n_seq_max, p.kv_unified = max_seqs, True
        p.n_threads = p.n_threads_batch = n_threads
        p.embeddings, p.pooling_type = True, lib.LLAMA_POOLING_TYPE_MEAN
        p.no_perf = True
        self._ctx = lib.llama_init_from_model(model, p)
        if not self._ctx:
            raise ModelLoadFailed("llama.cpp could not create an embedding context")
        self._mem = lib.llama_get_memory(self._ctx)
        self._batch = lib.llama_batch_init(max_tokens, 0, 1)
        self.n_embd = int(lib.llama_model_n_embd(model))
        self.max_tokens, self.max_seqs = max_tokens, max_seqs

    @property
    def closed(self) -> bool:
        return self._ctx is None

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[bytes]:
        if self._ctx is None:  # its batch and context are freed: llama.cpp would crash
            raise RuntimeError("embedding context used after close")
        b, i = self._batch, 0
        for seq, tokens in enumerate(inputs):
            for pos, token in enumerate(tokens):
                b.token[i], b.pos[i], b.n_seq_id[i] = token, pos, 1
                b.seq_id[i][0], b.logits[i] = seq, True  # pooling reads every token
                i += 1
        b.n_tokens = i
        self._l.llama_memory_clear(self._mem, True)
        code = int(self._l.llama_decode(self._ctx, b))
        if code != 0:
            raise DecodeFailed(code)
        return [normalised(np.ctypeslib.as_array(
            self._l.llama_get_embeddings_seq(self._ctx, seq), shape=(self.n_embd,)))
            for seq in range(len(inputs))]

    def close(self) -> None:
        if self._ctx:
            self._l.llama_batch_free(self._batch)
            self._l.llama_free(self._ctx)
            self._ctx = None
