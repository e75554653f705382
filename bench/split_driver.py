"""A split model's head, driven over stdin by bench/pipeline_split.py.

Loads gemma3-270m with its last layers on the given ggml RPC servers (as the engine
process loads a head: weight repacking off, the head's tensors kept here), says "loaded",
then for each line "N" generates N tokens greedily and prints a JSON line with the timings
and the text.

    split_driver.py ENDPOINTS LAYERS [MODEL] [--library meshllm|stock]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from meshllm.common.models import materialize
from meshllm.common.types import SamplingParams
from meshllm.native import rpc
from meshllm.worker.engine.batch import BatchConfig, BatchEngine, Delta, Event, Failed, LoadOptions

PROMPT = "Write a detailed essay about the history of the printing press."


def load(model: str, endpoints: list[str], layers: list[int], library: str) -> BatchEngine:
    rpc.ensure_backends()
    options = LoadOptions(repack=False)
    if endpoints:  # without stages: the same model whole, as the baseline
        rpc.add_rpc_servers(endpoints, rpc.RpcLibrary(library))
        options = LoadOptions.split_head(layers, repack=False)
    # Every run processes the whole prompt again, as the first one did.
    return BatchEngine(BatchConfig(model_path=model, n_ctx=512, n_slots=1, n_threads=1,
                                   prefix_reuse=False, load=options))


def generate(engine: BatchEngine, run: int, n: int) -> dict[str, Any]:
    stamps: list[float] = []
    text: list[str] = []
    failed: list[Failed] = []

    def on_event(event: Event) -> None:
        if isinstance(event, Delta):
            stamps.extend([time.perf_counter()] if event.tokens else [])
            text.append(event.text)
        elif isinstance(event, Failed):
            failed.append(event)

    started = time.perf_counter()
    engine.submit(f"run{run}", engine.tokenize(PROMPT),
                  SamplingParams(max_tokens=n, temperature=0.0), on_event)
    while engine.step():
        pass
    if failed:
        raise failed[0].error
    decode = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
    return {"ttft_s": stamps[0] - started, "s_per_token": decode, "tokens": len(stamps),
            "text": "".join(text)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("endpoints", help="comma-separated RPC servers; empty: whole model")
    parser.add_argument("layers", help="comma-separated layer counts, one per server")
    parser.add_argument("model", nargs="?", default="")
    parser.add_argument("--library", default="meshllm", choices=("meshllm", "stock"))
    args = parser.parse_args()
    endpoints = [e for e in args.endpoints.split(",") if e]
    layers = [int(x) for x in args.layers.split(",") if x]
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # as in the engine process: whatever llama.cpp prints stays off `out`
    engine = load(args.model or str(materialize("gemma3-270m")), endpoints, layers,
                  args.library)
    print("loaded", file=out, flush=True)
    for run, line in enumerate(sys.stdin):
        print(json.dumps(generate(engine, run, int(line))), file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
