"""A mixture-of-experts model run through llama.cpp's low-level API, with the router's
choices in view: llama.cpp calls an eval callback (`cb_eval`) for each graph tensor it is
asked about, and names the router's top-k tensor of block N `ffn_moe_topk-N` (int32 expert
ids, one row of `expert_used_count` per token). Used by calibration and the benchmarks.

Loaded as the worker's engines load (weight repacking off, engine_wire.DEFAULT_WEIGHT_REPACK):
repacked Q8_0 expert matrices crashed llama.cpp 0.3.36's CPU backend here (a segfault in the
first decode on an AMX machine). Every token asks for its logits, because llama.cpp skips the
last block's feed-forward for tokens without output, and its router with it.

A model that no single node holds can be probed as a layer split: its last layers on ggml
RPC servers (`python -m meshllm.worker.rpc_server` on the nodes that lend memory), loaded
as the worker loads a split's head; the callback sees the remote layers' routers too.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from meshllm.common.errors import ModelSourceError

TOPK_NAME = re.compile(rb"^ffn_moe_topk-(\d+)$")
GGML_TYPE_I32 = 26

# (block index, expert ids [tokens, expert_used_count])
RouterSink = Callable[[int, np.ndarray], None]


class _TensorHead(ctypes.Structure):
    """The stable head of ggml's `struct ggml_tensor`: type, buffer, ne[4], nb[4]."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4)]


def _ggml() -> Any:
    """libggml-base as llama.cpp loaded it (the .so.0 name: another copy would be a second
    ggml, FIELD-NOTES)."""
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so.0"))
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                            ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    return lib


def _router_callback(ggml: Any, sink: RouterSink) -> Any:
    import llama_cpp

    def callback(tensor: int, ask: bool, _: Any) -> bool:
        match = TOPK_NAME.match(ggml.ggml_get_name(tensor) or b"")
        if match is None:
            return not ask  # not wanted (asked); computing goes on (told)
        if ask:
            return True
        head = _TensorHead.from_address(tensor)
        if head.type != GGML_TYPE_I32:
            return True
        used, tokens = int(head.ne[0]), int(head.ne[1])
        ids = np.empty((tokens, used), dtype=np.int32)
        for row in range(tokens):  # a view of the argsort: rows are strided
            ggml.ggml_backend_tensor_get(tensor, ids[row].ctypes.data, row * head.nb[1],
                                         used * 4)
        sink(int(match.group(1)), ids)
        return True

    return llama_cpp.ggml_backend_sched_eval_callback(callback)


def _model_params(stages: Sequence[str], stage_layers: Sequence[int]) -> Any:
    """llama.cpp's model parameters as the worker loads a whole model or a split's head;
    the returned holder keeps the buffers they point into alive."""
    from meshllm.native import rpc
    from meshllm.worker.engine.batch.load_options import LoadOptions, model_params

    rpc.ensure_backends()
    if len(stages) != len(stage_layers):
        raise ModelSourceError(
            f"{len(stages)} RPC stages but {len(stage_layers)} layer counts: give one each")
    if not stages:
        return model_params(LoadOptions(repack=False))
    rpc.add_rpc_servers(list(stages))
    return model_params(LoadOptions.split_head(stage_layers, repack=False))


class ProbedModel:
    """One model and one context (a single sequence); `router` sees every routing. With
    `stages` (RPC servers, host:port), stage_layers[i] of the last layers run on stages[i]."""

    def __init__(self, path: Path, *, n_ctx: int = 512, n_batch: int = 128, threads: int = 1,
                 router: RouterSink | None = None, stages: Sequence[str] = (),
                 stage_layers: Sequence[int] = ()) -> None:
        import llama_cpp
        from llama_cpp._logger import set_verbose

        set_verbose(False)
        self._l: Any = llama_cpp
        llama_cpp.llama_backend_init()
        self._params = _model_params(stages, stage_layers)
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(),
                                                           self._params.native)
        if not self._model:
            raise ModelSourceError(f"llama.cpp could not load {path}: is it a GGUF file?")
        ctx = llama_cpp.llama_context_default_params()
        ctx.n_ctx, ctx.n_batch, ctx.n_ubatch = n_ctx, n_batch, n_batch
        ctx.n_threads = ctx.n_threads_batch = threads
        ctx.no_perf = True
        self._callback = None if router is None else _router_callback(_ggml(), router)
        if self._callback is not None:
            ctx.cb_eval, ctx.cb_eval_user_data = self._callback, None
        self._ctx = llama_cpp.llama_init_from_model(self._model, ctx)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise ModelSourceError(f"llama.cpp could not make a context for {path}")
        self.n_ctx, self.n_batch = n_ctx, n_batch
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        data = text.encode()
        buf = (self._l.llama_token * (len(data) + 8))()
        n = self._l.llama_tokenize(self._vocab, data, len(data), buf, len(buf), add_bos, True)
        return list(buf[:n])

    def clear(self) -> None:
        self._l.llama_memory_clear(self._l.llama_get_memory(self._ctx), True)

    def evaluate(self, tokens: Sequence[int], start: int = 0, keep: bool = True) -> np.ndarray:
        """Evaluates `tokens` at positions start.. in batches; the logits of every token
        ([len(tokens), n_vocab] float32, a copy; none with keep=False)."""
        if start + len(tokens) > self.n_ctx:
            raise ModelSourceError(
                f"{start + len(tokens)} tokens do not fit the probe's context of {self.n_ctx}")
        rows = []
        for at in range(0, len(tokens), self.n_batch):
            part = tokens[at:at + self.n_batch]
            batch = self._batch
            batch.n_tokens = len(part)
            for i, token in enumerate(part):
                batch.token[i], batch.pos[i] = token, start + at + i
                batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = 1, 0, True
            if self._l.llama_decode(self._ctx, batch) != 0:
                raise ModelSourceError("llama.cpp failed to decode a batch")
            if keep:
                logits = self._l.llama_get_logits(self._ctx)
                rows.append(np.ctypeslib.as_array(logits, shape=(len(part), self.n_vocab))
                            .copy())
        return np.concatenate(rows) if rows else np.empty((0, self.n_vocab), np.float32)

    def greedy(self, prompt: Sequence[int], n: int) -> list[int]:
        """Up to `n` greedy tokens after `prompt` (the end-of-text token ends them, and is
        the last), from an empty cache."""
        self.clear()
        eos = int(self._l.llama_vocab_eos(self._vocab))
        out = [int(self.evaluate(prompt)[-1].argmax())]
        while len(out) < n and out[-1] != eos:
            out.append(int(self.evaluate(out[-1:], len(prompt) + len(out) - 1)[-1].argmax()))
        return out

    def close(self) -> None:
        if self._ctx:
            self._l.llama_batch_free(self._batch)
            self._l.llama_free(self._ctx)
            self._l.llama_model_free(self._model)
            self._ctx = None

    def __enter__(self) -> ProbedModel:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
