"""A split model's head with one model and one or two llama contexts, driven over stdin.

Scheme (A), steps 1 and 2 of docs/split-latency.md section 4: gemma3-270m is loaded once,
its last layers on the given ggml RPC servers (one copy of the weights on each stage),
and `--contexts` llama contexts are made on it, each with its own KV cache and compute
buffers (on the stages too). Each context decodes its own group of sequences from its own
thread; ctypes releases the GIL in llama_decode, so while one context waits on a stage the
other computes its head layers. `--pipelined on` opts the RPC connections in to our
client's pipelining (ggml_backend_rpc_meshllm_set_pipelined, rpc_patch.py): a request that
waits for a reply no longer holds the socket, so the second context's step goes out while
the first one's computes on the stage.

Says "loaded", then for each JSON line {"prompts": [...], "max_tokens": N} decodes the
prompts greedily, split into `--contexts` contiguous groups, always N tokens each (no stop
at end of generation, so that runs compare token for token), and prints a JSON line: the
token ids of each prompt, the elapsed time, and each group's prefill and decode times.

    split_pipelined_head.py ENDPOINTS LAYERS [--contexts 1|2] [--pipelined on|off]
        [--threads 1] [--slots 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from meshllm.common.models import materialize
from meshllm.native import rpc
from meshllm.worker.engine.batch.load_options import LoadOptions, model_params
from meshllm.worker.engine.batch.numerics import REPRODUCIBLE

CTX_PER_SEQ = 512  # KV cells per sequence, as split_head.py's engine has
N_BATCH = 512


@dataclass
class Group:
    """One llama context and the batch it decodes with."""

    ctx: Any
    mem: Any
    batch: Any
    n_seq: int


@dataclass
class GroupRun:
    tokens: list[list[int]]
    prefill_s: float
    decode_s: float


def load_model(llama: Any, endpoints: list[str], layers: list[int], pipelined: bool
               ) -> tuple[Any, Any]:
    """(the model, the ModelParams that must outlive it), loaded as the engine loads a head."""
    rpc.ensure_backends()
    if endpoints:
        rpc.add_rpc_servers(endpoints)
        if pipelined:  # before the model load opens the connection that stays
            rpc.set_pipelined(endpoints)
    options = (LoadOptions.split_head(layers, repack=False) if endpoints
               else LoadOptions(repack=False))
    params = model_params(options)
    model = llama.llama_model_load_from_file(str(materialize("gemma3-270m")).encode(),
                                             params.native)
    if not model:
        raise RuntimeError("llama.cpp could not load the model")
    return model, params


def make_group(llama: Any, model: Any, n_seq: int, threads: int) -> Group:
    """A context as the engine makes one (backend.LlamaBackend._context_params) with the
    deterministic numerics: one KV stream per sequence, full-size sliding-window cache."""
    p = llama.llama_context_default_params()
    p.n_ctx, p.n_seq_max = n_seq * CTX_PER_SEQ, n_seq
    p.n_batch = p.n_ubatch = N_BATCH
    p.n_threads = p.n_threads_batch = threads
    p.swa_full = True
    p.kv_unified = False
    p.no_perf = True
    REPRODUCIBLE.apply_to_context(p, llama)
    ctx = llama.llama_init_from_model(model, p)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context")
    return Group(ctx, llama.llama_get_memory(ctx), llama.llama_batch_init(N_BATCH, 0, 1), n_seq)


def fill(batch: Any, rows: list[tuple[int, int, int, bool]]) -> None:
    """rows: (token, position, sequence, wants logits)."""
    batch.n_tokens = len(rows)
    for i, (token, pos, seq, logits) in enumerate(rows):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, logits


def greedy(llama: Any, ctx: Any, indices: list[int], n_vocab: int) -> list[int]:
    return [int(np.ctypeslib.as_array(llama.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
                .argmax()) for i in indices]


def decode(llama: Any, group: Group, rows: list[tuple[int, int, int, bool]]) -> None:
    fill(group.batch, rows)
    code = int(llama.llama_decode(group.ctx, group.batch))
    if code != 0:
        raise RuntimeError(f"llama_decode returned {code}")


def generate(llama: Any, group: Group, prompts: list[list[int]], max_tokens: int,
             n_vocab: int) -> GroupRun:
    """Greedy decoding of `prompts` (sequences 0..k-1 of the group), max_tokens each."""
    llama.llama_memory_clear(group.mem, True)
    started = time.perf_counter()
    rows = [(t, pos, seq, pos == len(p) - 1)
            for seq, p in enumerate(prompts) for pos, t in enumerate(p)]
    decode(llama, group, rows)
    last = list(np.cumsum([len(p) for p in prompts]) - 1)
    out = [[t] for t in greedy(llama, group.ctx, [int(i) for i in last], n_vocab)]
    prefilled = time.perf_counter()
    for step in range(max_tokens - 1):
        decode(llama, group, [(out[s][-1], len(p) + step, s, True)
                              for s, p in enumerate(prompts)])
        for s, token in enumerate(greedy(llama, group.ctx, list(range(len(prompts))),
                                         n_vocab)):
            out[s].append(token)
    return GroupRun(out, prefilled - started, time.perf_counter() - prefilled)


def tokenize(llama: Any, vocab: Any, text: str) -> list[int]:
    data = text.encode()
    buf = (llama.llama_token * (len(data) + 8))()
    n = int(llama.llama_tokenize(vocab, data, len(data), buf, len(buf), True, True))
    return list(buf[:n])


def run(llama: Any, groups: list[Group], vocab: Any, job: dict[str, Any]) -> dict[str, Any]:
    """The job's prompts in contiguous groups, one thread per context."""
    prompts = [tokenize(llama, vocab, p) for p in job["prompts"]]
    n_vocab = int(llama.llama_vocab_n_tokens(vocab))
    share = -(-len(prompts) // len(groups))
    parts = [prompts[i * share:(i + 1) * share] for i in range(len(groups))]
    results: list[GroupRun | BaseException | None] = [None] * len(groups)

    def work(i: int) -> None:
        try:
            results[i] = generate(llama, groups[i], parts[i], job["max_tokens"], n_vocab)
        except BaseException as exc:  # reported to the driver below
            results[i] = exc

    started = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i, part in enumerate(parts) if part]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    done = [r for r in results if r is not None]
    for r in done:
        if isinstance(r, BaseException):
            raise r
    runs = [r for r in done if isinstance(r, GroupRun)]
    return {"tokens": [t for r in runs for t in r.tokens], "elapsed_s": elapsed,
            "prefill_s": [r.prefill_s for r in runs], "decode_s": [r.decode_s for r in runs]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("endpoints", help="comma-separated RPC servers; empty: whole model")
    parser.add_argument("layers", help="comma-separated layer counts, one per server")
    parser.add_argument("--contexts", type=int, default=1)
    parser.add_argument("--pipelined", choices=("on", "off"), default="off")
    parser.add_argument("--threads", type=int, default=1, help="per context")
    parser.add_argument("--slots", type=int, default=8, help="sequences in all")
    args = parser.parse_args()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever llama.cpp prints stays off `out`
    import llama_cpp
    from llama_cpp._logger import set_verbose

    set_verbose(False)
    REPRODUCIBLE.apply_to_process()  # before the first matmul: ggml reads it once
    llama_cpp.llama_backend_init()
    endpoints = [e for e in args.endpoints.split(",") if e]
    model, _params = load_model(llama_cpp, endpoints,
                                [int(x) for x in args.layers.split(",") if x],
                                args.pipelined == "on")
    per_context = -(-args.slots // args.contexts)
    groups = [make_group(llama_cpp, model, per_context, args.threads)
              for _ in range(args.contexts)]
    vocab = llama_cpp.llama_model_get_vocab(model)
    print("loaded", file=out, flush=True)
    for line in sys.stdin:
        print(json.dumps(run(llama_cpp, groups, vocab, json.loads(line))), file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
