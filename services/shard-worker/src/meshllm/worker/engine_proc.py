"""The engine process: one llama.cpp model, driven over stdin/stdout with JSON lines.

It runs apart from the service so that a native crash or abort (llama.cpp aborts on a
lost RPC peer, for one) kills only this process; the service reports it and restarts it.

Commands in:  {"op": "load", "path", "n_ctx", "n_threads"}
              {"op": "generate", "id", "text" | "chat", "sampling"}
              {"op": "cancel", "id"}
Events out:   {"ev": "loaded", "n_ctx"} | {"ev": "load_failed", "error"}
              {"ev": "delta", "id", "text", "tokens"}
              {"ev": "finished", "id", "finish_reason", "prompt_tokens", "completion_tokens"}
              {"ev": "error", "id", "kind", "message"}
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

from meshllm.common.errors import InvalidGenerateRequest, PromptTooLong
from meshllm.common.types import ChatMessage, SamplingParams
from meshllm.worker.generation import Generator


class Channel:
    """Writes events as JSON lines on a private copy of stdout.

    llama.cpp may print to fd 1; the protocol gets its own descriptor and fd 1 is pointed
    at stderr so that nothing stray lands in the event stream.
    """

    def __init__(self) -> None:
        self._out: IO[str] = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        self._lock = threading.Lock()

    def send(self, **event: Any) -> None:
        line = json.dumps(event, ensure_ascii=False)
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()


def sampling_from(d: dict[str, Any]) -> SamplingParams:
    return SamplingParams(
        max_tokens=int(d.get("max_tokens", 0)), temperature=float(d.get("temperature", 1.0)),
        top_p=float(d.get("top_p", 1.0)), seed=d.get("seed"), stop=tuple(d.get("stop", ())),
        top_k=int(d.get("top_k", 0)), presence_penalty=float(d.get("presence_penalty", 0.0)),
        frequency_penalty=float(d.get("frequency_penalty", 0.0)),
        repeat_penalty=float(d.get("repeat_penalty", 1.0)),
    )


# The head of a split keeps the embeddings and the output layer (tied to the embeddings
# in many models): llama.cpp would otherwise put the output on the last stage, which then
# sends the whole logits vector (vocabulary x 4 bytes, 1 MB for gemma3) back every token.
HEAD_TENSORS = r"^(token_embd|output|output_norm)\.weight$"


ProgressCallback = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_float, ctypes.c_void_p)


def progress_reporter(out: Channel) -> Any:
    """A llama.cpp load-progress callback that sends a "progress" event every 5%."""
    last = [-1.0]

    def report(fraction: float, _: Any) -> bool:
        if fraction - last[0] >= 0.05 or fraction >= 1.0:
            last[0] = fraction
            out.send(ev="progress", fraction=round(float(fraction), 3))
        return True  # keep loading

    return ProgressCallback(report)


@contextlib.contextmanager
def weight_repacking(enabled: bool, keep_on_cpu: str = "", progress: Any = None
                     ) -> Iterator[None]:
    """Set model parameters llama-cpp-python does not expose while a model loads.

    CPU weight repacking re-lays quantized weights for faster CPU kernels, but a ggml RPC
    server cannot repack the layers it receives, so a split model would compute its layers
    with other kernels than a whole one and greedy outputs would drift apart after a few
    dozen tokens. Off, a model answers the same whole or split. `keep_on_cpu` names
    tensors (a regular expression) that stay in this process when layers are offloaded.
    """
    import llama_cpp.llama_cpp as native

    original = native.llama_model_default_params
    overrides = None
    if keep_on_cpu:
        from meshllm.native import rpc

        overrides = rpc.cpu_overrides(keep_on_cpu)

    def adjusted() -> Any:
        params = original()
        params.use_extra_bufts = enabled
        if overrides is not None:
            params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        if progress is not None:
            params.progress_callback = progress
        return params

    native.llama_model_default_params = adjusted
    try:
        yield
    finally:
        native.llama_model_default_params = original


def offload_params(stage_layers: list[int]) -> dict[str, Any]:
    """llama.cpp arguments that put `stage_layers[i]` of the last layers on RPC device i.

    llama.cpp counts the output layer as the last offloadable layer and shares layers out
    by their position among all offloaded ones: one more layer, given to the last device,
    lands the output there on paper; HEAD_TENSORS keeps its weights (and so its work) here.
    """
    split = [float(n) for n in stage_layers]
    split[-1] += 1
    return {"n_gpu_layers": sum(stage_layers) + 1, "tensor_split": split}


def load(cmd: dict[str, Any], out: Channel | None = None) -> Generator:
    from llama_cpp import Llama  # imported here: only the engine process needs llama.cpp
    from meshllm.native import rpc

    rpc.ensure_backends()
    split: dict[str, Any] = {}
    if cmd.get("rpc_endpoints"):
        # Registered RPC devices come first in llama.cpp's device list and take the last
        # layers in order; the embeddings, output and first layers stay here: the head.
        rpc.add_rpc_servers(list(cmd["rpc_endpoints"]))
        split = offload_params([int(x) for x in cmd["tensor_split"]])
    keep = HEAD_TENSORS if split else ""
    progress = progress_reporter(out) if out is not None else None
    with weight_repacking(bool(cmd.get("weight_repack", False)), keep, progress):
        llm = Llama(model_path=cmd["path"], n_ctx=int(cmd["n_ctx"]),
                    n_threads=int(cmd["n_threads"]), n_threads_batch=int(cmd["n_threads"]),
                    verbose=False, **split)
    return Generator(llm)


def serve_one(gen: Generator, cmd: dict[str, Any], out: Channel,
              cancelled: set[str], lock: threading.Lock) -> None:
    rid = cmd["id"]
    started_ns, first_token_ns = time.time_ns(), 0  # for the service's trace of this request
    chat = None
    if cmd.get("chat") is not None:
        chat = tuple(ChatMessage(m["role"], m["content"]) for m in cmd["chat"])
    try:
        tokens, stops = gen.prompt_tokens(cmd.get("text"), chat)
    except (PromptTooLong, InvalidGenerateRequest) as exc:
        out.send(ev="error", id=rid, kind=type(exc).__name__, message=str(exc))
        return

    def is_cancelled() -> bool:
        with lock:
            return rid in cancelled

    def emit(text: str, n: int) -> None:
        nonlocal first_token_ns
        first_token_ns = first_token_ns or time.time_ns()
        out.send(ev="delta", id=rid, text=text, tokens=n)

    outcome = gen.run(tokens, stops, sampling_from(cmd.get("sampling", {})), emit, is_cancelled)
    out.send(ev="finished", id=rid, finish_reason=outcome.finish_reason,
             prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens,
             started_ns=started_ns, first_token_ns=first_token_ns)


def read_commands(jobs: queue.Queue[dict[str, Any] | None], cancelled: set[str],
                  lock: threading.Lock) -> None:
    """Reader thread: queues work and marks cancellations while generation runs."""
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "cancel":
            with lock:
                cancelled.add(cmd["id"])
        else:
            jobs.put(cmd)
    jobs.put(None)  # the service closed our stdin: exit


def main() -> int:
    out = Channel()
    first = json.loads(sys.stdin.readline() or "{}")
    try:
        gen = load(first, out)
    except Exception as exc:  # any load failure is reported to the service, which decides
        out.send(ev="load_failed", error=f"{type(exc).__name__}: {exc}")
        return 1
    out.send(ev="loaded", n_ctx=gen.n_ctx)
    jobs: queue.Queue[dict[str, Any] | None] = queue.Queue()
    cancelled: set[str] = set()
    lock = threading.Lock()
    threading.Thread(target=read_commands, args=(jobs, cancelled, lock), daemon=True).start()
    while (cmd := jobs.get()) is not None:
        with lock:
            skip = cmd["id"] in cancelled
        if not skip:
            serve_one(gen, cmd, out, cancelled, lock)
        with lock:
            cancelled.discard(cmd["id"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
