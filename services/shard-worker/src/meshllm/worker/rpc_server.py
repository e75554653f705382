"""`python -m meshllm.worker.rpc_server`: serve this machine's CPU over ggml RPC.

A stage of a split model runs one of these; the head's llama.cpp places layers on it.
It runs in its own process because the server call blocks forever and native failures
must not take the worker service down.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meshllm.native import rpc


def main() -> int:
    parser = argparse.ArgumentParser(prog="meshllm-rpc-server")
    parser.add_argument("--endpoint", required=True, help="host:port to listen on")
    parser.add_argument("--cache-dir", default="", help="tensor cache (reloads send hashes)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--library", choices=[x.value for x in rpc.RpcLibrary],
                        default=rpc.RpcLibrary.MESHLLM.value, help="ggml-rpc build to serve with")
    args = parser.parse_args()
    cache = Path(args.cache_dir) if args.cache_dir else None
    rpc.serve_cpu(args.endpoint, cache, args.threads, rpc.RpcLibrary(args.library))
    return 1  # serve_cpu returns only if the server could not start


if __name__ == "__main__":
    sys.exit(main())
