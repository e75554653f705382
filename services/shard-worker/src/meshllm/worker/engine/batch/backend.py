"""The model as the engine sees it: decode a mixed batch, read logit rows, trim a sequence.

`Backend` is a Protocol so that the scheduler and the acceptance rule can be tested on a
scripted model; `LlamaBackend` is the real one on llama-cpp-python's low-level API.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from meshllm.worker.engine.batch.embed import LlamaEmbedder
from meshllm.worker.engine.batch.errors import DecodeFailed, ModelLoadFailed
from meshllm.worker.engine.batch.load_options import LoadOptions, model_params
from meshllm.worker.engine.batch.numerics import FASTEST, Numerics
from meshllm.worker.engine.batch.sampling import Logits

log = logging.getLogger(__name__)


class Backend(Protocol):
    n_vocab: int

    def decode(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int],
               outputs: Sequence[bool]) -> list[Logits]:
        """Evaluates the batch; returns one logit row per True in `outputs`, in order.
        Rows stay valid until the next decode."""
        ...

    def seq_rm(self, seq: int, p0: int) -> bool:
        """Drops the sequence's KV from position p0 on (p0 < 0: all of it)."""
        ...

    def piece(self, token: int) -> bytes: ...

    def is_eog(self, token: int) -> bool: ...

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]: ...

    def grammar_tokenizer(self) -> Any:
        """The vocabulary as llguidance's LLTokenizer, for constrained decoding (built on
        the first grammar request: a second or two for a large vocabulary)."""
        ...


@dataclass(frozen=True)
class ContextSettings:
    """One llama.cpp context: its size, parallelism and the kernels it computes with."""

    n_ctx: int           # KV cells in all
    n_seq: int           # sequences (slots)
    n_threads: int
    n_batch: int         # most tokens in one llama_decode call
    kv_unified: bool     # one KV stream shared by the sequences (else one per sequence)
    numerics: Numerics = FASTEST


class LlamaBackend:
    """One llama.cpp model and context with n_seq sequences."""

    def __init__(self, path: str, context: ContextSettings,
                 load: LoadOptions | None = None) -> None:
        import llama_cpp  # only the engine process loads llama.cpp
        from llama_cpp._logger import set_verbose

        set_verbose(False)
        context.numerics.apply_to_process()
        self._l: Any = llama_cpp
        llama_cpp.llama_backend_init()
        self._params = model_params(load or LoadOptions())
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(),
                                                           self._params.native)
        if not self._model:
            raise ModelLoadFailed(f"llama.cpp could not load {path}")
        self._owns_model, self._path = True, str(path)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab: int = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._pieces: dict[int, bytes] = {}
        self._embedder: LlamaEmbedder | None = None
        try:
            self._open_context(context)
        except ModelLoadFailed:
            llama_cpp.llama_model_free(self._model)
            raise

    def _open_context(self, context: ContextSettings) -> None:
        self._ctx = self._l.llama_init_from_model(self._model, self._context_params(context))
        if not self._ctx:
            raise ModelLoadFailed(f"llama.cpp could not create a context for {self._path}")
        self._mem = self._l.llama_get_memory(self._ctx)
        self.n_batch = context.n_batch
        self._n_threads = context.n_threads
        self._batch = self._l.llama_batch_init(context.n_batch, 0, 1)

    def sibling(self, context: ContextSettings) -> LlamaBackend:
        """Another context on this model: its own KV cache and compute buffers (on a split,
        on the stages too), the weights shared; for a group of slots (groups.py). Close it
        before this one, which frees the model."""
        other = LlamaBackend.__new__(LlamaBackend)
        other._l, other._params, other._model = self._l, self._params, self._model
        other._owns_model, other._path = False, self._path
        other._vocab, other.n_vocab, other._pieces = self._vocab, self.n_vocab, self._pieces
        other._embedder = None
        other._open_context(context)
        return other

    def _context_params(self, c: ContextSettings) -> Any:
        p = self._l.llama_context_default_params()
        p.n_ctx, p.n_seq_max = c.n_ctx, c.n_seq
        p.n_batch, p.n_ubatch = c.n_batch, min(c.n_batch, 512)
        p.n_threads = p.n_threads_batch = c.n_threads
        # A full-size sliding-window cache lets us drop any suffix of a sequence: rejected
        # drafts and the unshared tail of a reused prefix (Gemma 3 uses sliding windows).
        p.swa_full = True
        p.kv_unified = c.kv_unified
        p.no_perf = True
        c.numerics.apply_to_context(p, self._l)
        return p

    def decode(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int],
               outputs: Sequence[bool]) -> list[Logits]:
        b = self._batch
        n = len(tokens)
        b.n_tokens = n
        for i in range(n):
            b.token[i] = tokens[i]
            b.pos[i] = positions[i]
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seqs[i]
            b.logits[i] = outputs[i]
        code = int(self._l.llama_decode(self._ctx, b))
        if code != 0:
            raise DecodeFailed(code)
        rows: list[Logits] = []
        for i in range(n):
            if outputs[i]:
                ptr = self._l.llama_get_logits_ith(self._ctx, i)
                rows.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)))
        return rows

    def seq_rm(self, seq: int, p0: int) -> bool:
        return bool(self._l.llama_memory_seq_rm(self._mem, seq, p0, -1))

    def piece(self, token: int) -> bytes:
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(256)
            n = int(self._l.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False))
            cached = buf.raw[:max(n, 0)]
            self._pieces[token] = cached
        return cached

    def is_eog(self, token: int) -> bool:
        return bool(self._l.llama_vocab_is_eog(self._vocab, token))

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (self._l.llama_token * cap)()
        n = int(self._l.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, True))
        if n < 0:  # the buffer was too small: -n is the size needed
            buf = (self._l.llama_token * -n)()
            n = int(self._l.llama_tokenize(self._vocab, data, len(data), buf, -n, add_bos, True))
        return list(buf[:n])

    def grammar_tokenizer(self) -> Any:
        """As llguidance.llamacpp.lltokenizer_from_vocab, without its deprecated per-token
        call (a warning per token), and with every end-of-generation token as an EOS."""
        from llguidance import LLTokenizer

        lib, buf = self._l, ctypes.create_string_buffer(1 << 14)
        control, user = lib.LLAMA_TOKEN_ATTR_CONTROL, lib.LLAMA_TOKEN_ATTR_USER_DEFINED
        tokens: list[bytes] = []
        for token in range(self.n_vocab):
            n = int(lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True))
            data = buf.raw[:max(n, 0)]
            attr = int(lib.llama_vocab_get_attr(self._vocab, token))
            # Control tokens, and user-defined ones that look like them, are special:
            # llguidance marks them with a 0xff prefix so that no text matches them.
            if attr & control or (attr & user and data.startswith(b"<")
                                  and data.endswith(b">")):
                data = b"\xff" + data
            tokens.append(data)
        tokenize = ctypes.cast(lib.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
        eog = [t for t in range(self.n_vocab) if self.is_eog(t)]
        return LLTokenizer.from_llamacpp(  # type: ignore[attr-defined]
            tokens=tokens, vocab_ptr=self._vocab, tokenize_fptr=tokenize, eos_token=eog,
            slices=None)

    def embedder(self, max_tokens: int, max_seqs: int) -> LlamaEmbedder:
        """The embedding context on this model, made on first use and again after the
        engine freed an idle one (see batch/embed)."""
        if self._embedder is None or self._embedder.closed:
            self._embedder = LlamaEmbedder(self._l, self._model, self._n_threads,
                                           max_tokens, max_seqs)
        return self._embedder

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = int(self._l.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf)))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def special_piece(self, which: str) -> str:
        """The text of the BOS or EOS token ("bos" | "eos"), as chat templates want it."""
        fn = self._l.llama_vocab_bos if which == "bos" else self._l.llama_vocab_eos
        token = int(fn(self._vocab))
        if token < 0:
            return ""
        buf = ctypes.create_string_buffer(256)
        n = int(self._l.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True))
        return buf.raw[:max(n, 0)].decode("utf-8", "replace")

    def close(self) -> None:
        if self._embedder is not None:
            self._embedder.close()
        if self._ctx:
            self._l.llama_batch_free(self._batch)
            self._l.llama_free(self._ctx)
            if self._owns_model:
                self._l.llama_model_free(self._model)
            self._ctx = None


def requantize(src: str | Path, dst: str | Path, ftype_name: str, n_threads: int = 2) -> Path:
    """Writes `src` re-quantized to `ftype_name` (e.g. "F16", "Q8_0"): a slower target
    that agrees with the original model most of the time, for speculative decoding."""
    import llama_cpp

    dst = Path(dst)
    if dst.is_file():
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name.upper()}")
    params.nthread = n_threads
    params.allow_requantize = True
    tmp = dst.with_suffix(".part")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(),
                                      ctypes.byref(params)) != 0:
        raise ModelLoadFailed(f"quantizing {src} to {ftype_name} failed")
    tmp.rename(dst)
    return dst
