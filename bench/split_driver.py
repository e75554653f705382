"""A split model's head, driven over stdin by bench/pipeline_split.py.

Loads gemma3-270m with its last layers on the given ggml RPC servers, says "loaded", then
for each line "N" generates N tokens greedily and prints a JSON line with the timings and
the text.

    split_driver.py ENDPOINTS LAYERS [MODEL] [--library meshllm|stock]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from meshllm.common.models import materialize
from meshllm.native import rpc
from meshllm.worker.load_params import HEAD_TENSORS, offload_params, weight_repacking

PROMPT = "Write a detailed essay about the history of the printing press."


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("endpoints", help="comma-separated RPC servers; empty: whole model")
    parser.add_argument("layers", help="comma-separated layer counts, one per server")
    parser.add_argument("model", nargs="?", default="")
    parser.add_argument("--library", default="meshllm", choices=("meshllm", "stock"))
    args = parser.parse_args()
    endpoints = [e for e in args.endpoints.split(",") if e]
    layers = [int(x) for x in args.layers.split(",") if x]
    model = args.model or str(materialize("gemma3-270m"))
    from llama_cpp import Llama

    offload: dict[str, Any] = {}
    if endpoints:  # without stages: the same model whole, as the baseline
        rpc.add_rpc_servers(endpoints, rpc.RpcLibrary(args.library))
        offload = offload_params(layers)
    with weight_repacking(False, HEAD_TENSORS if endpoints else ""):
        llm: Any = Llama(model_path=model, n_ctx=512, n_threads=1, verbose=False, **offload)
    print("loaded", flush=True)
    for line in sys.stdin:
        n = int(line)
        llm.reset()
        started = time.perf_counter()
        stamps, text = [], []
        for chunk in llm.create_completion(PROMPT, max_tokens=n, temperature=0, stream=True):
            stamps.append(time.perf_counter())
            text.append(chunk["choices"][0]["text"])
        decode = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
        print(json.dumps({"ttft_s": stamps[0] - started, "s_per_token": decode,
                          "tokens": len(stamps), "text": "".join(text)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
