"""A split model's head, driven over stdin by bench/pipeline_split.py.

Loads gemma3-270m with its last layers on the given ggml RPC servers, says "loaded", then
for each line "N" generates N tokens greedily and prints a JSON line with the timings.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from meshllm.common.models import materialize
from meshllm.native import rpc
from meshllm.worker.load_params import HEAD_TENSORS, offload_params, weight_repacking

PROMPT = "Write a detailed essay about the history of the printing press."


def main() -> int:
    endpoints = [e for e in sys.argv[1].split(",") if e]
    layers = [int(x) for x in sys.argv[2].split(",") if x]
    model = sys.argv[3] if len(sys.argv) > 3 else str(materialize("gemma3-270m"))
    from llama_cpp import Llama

    offload: dict[str, Any] = {}
    if endpoints:  # without stages: the same model whole, as the baseline
        rpc.add_rpc_servers(endpoints)
        offload = offload_params(layers)
    with weight_repacking(False, HEAD_TENSORS if endpoints else ""):
        llm: Any = Llama(model_path=model, n_ctx=512, n_threads=1, verbose=False, **offload)
    print("loaded", flush=True)
    for line in sys.stdin:
        n = int(line)
        llm.reset()
        started = time.perf_counter()
        stamps = []
        for _ in llm.create_completion(PROMPT, max_tokens=n, temperature=0, stream=True):
            stamps.append(time.perf_counter())
        decode = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
        print(json.dumps({"ttft_s": stamps[0] - started, "s_per_token": decode,
                          "tokens": len(stamps)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
