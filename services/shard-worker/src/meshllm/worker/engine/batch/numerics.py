"""Which llama.cpp CPU kernels compute a model: the fastest ones, or only those whose
results do not depend on the batch shape (reproducible generation, issue 14).

llama.cpp's CPU backend picks kernels by batch shape and they sum in different orders, so
the same token computed alone (a decode step, the last prompt token after a prefix-cache
hit) and inside a batch (a prompt chunk, eight streams decoding together) gets logits that
differ in the last bits, and greedy output drifts apart after a few dozen tokens. Found with
`bench/determinism_probe.py` (tensor by tensor, cold against warm), see docs/determinism.md:

- the tiled K-quant matmul (ggml-cpu/tiled, Q2_K..Q6_K and IQ types at 8+ rows) against
  vec_dot for fewer rows: off with GGML_CPU_TILED_MM=0, read once per process;
- flash attention's tiled path (64+ query rows of one stream) and split-KV path (one query
  row over 512+ KV cells, partial sums per thread) against its row-by-row path: both need
  F16/F32 K and V, so a Q8_0 KV cache leaves only the row-by-row path;
- attention without flash attention goes through F16 matmuls that llamafile's sgemm takes
  at 2+ rows: flash attention stays on, so attention never becomes a matmul;
- repacked weights (gemm at 4+ rows, gemv below): off (engine_wire.DEFAULT_WEIGHT_REPACK).

The Q8_0 KV cache also halves the cache's memory; its effect on quality is the one
llama.cpp documents for `--cache-type-k/v q8_0` (negligible perplexity change).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshllm.common.config import export_to_process

FLASH_ATTN_AUTO, FLASH_ATTN_ON = -1, 1  # llama_flash_attn_type
TILED_MATMUL_ENV = "GGML_CPU_TILED_MM"


@dataclass(frozen=True)
class Numerics:
    """The kernel choices that decide a context's numbers; `Numerics()` is llama.cpp's
    default (fastest), `REPRODUCIBLE` the batch-invariant set."""

    flash_attn: int = FLASH_ATTN_AUTO
    kv_type: str = "f16"        # ggml type of the K and V cache: f16 | q8_0
    tiled_matmul: bool = True   # ggml's tiled K-quant matmul (a process-wide switch)

    @property
    def reproducible(self) -> bool:
        return self == REPRODUCIBLE

    def process_env(self) -> Mapping[str, str]:
        """Environment a process computing with these numerics must start with (ggml reads
        it once, at its first matmul): the worker gives it to the engine process and to a
        split's stage servers."""
        return {} if self.tiled_matmul else {TILED_MATMUL_ENV: "0"}

    def apply_to_process(self) -> None:
        """Sets process_env() in this process, for BatchEngine run in a process that did not
        start with it (tests, benchmarks). Effective only before this process's first
        matmul: ggml reads the switch once, so one process computes with one setting."""
        export_to_process(self.process_env())

    def apply_to_context(self, params: Any, llama_cpp: Any) -> None:
        """Sets the context parameters (a llama_context_params) these numerics decide."""
        params.flash_attn_type = self.flash_attn
        params.type_k = params.type_v = getattr(llama_cpp, f"GGML_TYPE_{self.kv_type.upper()}")


REPRODUCIBLE = Numerics(flash_attn=FLASH_ATTN_ON, kv_type="q8_0", tiled_matmul=False)
FASTEST = Numerics()


def numerics_for(deterministic: bool) -> Numerics:
    return REPRODUCIBLE if deterministic else FASTEST

