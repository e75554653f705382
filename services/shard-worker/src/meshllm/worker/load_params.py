"""llama.cpp model parameters that llama-cpp-python does not expose, set while a model
loads: weight repacking, tensors kept on the head, layer offload to RPC stages, progress."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator, Sequence
from typing import Any

# The head of a split keeps the embeddings and the output layer (tied to the embeddings
# in many models): llama.cpp would otherwise put the output on the last stage, which then
# sends the whole logits vector (vocabulary x 4 bytes, 1 MB for gemma3) back every token.
HEAD_TENSORS = r"^(token_embd|output|output_norm)\.weight$"


ProgressCallback = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_float, ctypes.c_void_p)


def progress_reporter(send: Any) -> Any:
    """A llama.cpp load-progress callback calling send(fraction) every 5%."""
    last = [-1.0]

    def report(fraction: float, _: Any) -> bool:
        if fraction - last[0] >= 0.05 or fraction >= 1.0:
            last[0] = fraction
            send(round(float(fraction), 3))
        return True  # keep loading

    return ProgressCallback(report)


@contextlib.contextmanager
def weight_repacking(enabled: bool, keep_on_cpu: str = "", progress: Any = None,
                     offload: dict[str, Any] | None = None) -> Iterator[None]:
    """Adjust llama.cpp's default model parameters while a model loads.

    CPU weight repacking re-lays quantized weights for faster CPU kernels, but a ggml RPC
    server cannot repack the layers it receives, so a split model would compute its layers
    with other kernels than a whole one and greedy outputs would drift apart after a few
    dozen tokens. Off, a model answers the same whole or split. `keep_on_cpu` names
    tensors (a regular expression) that stay in this process when layers are offloaded;
    `offload` is `offload_params(...)`; `progress` a `progress_reporter`. Both
    `llama_cpp.llama_model_default_params` names are adjusted: the `Llama` class uses one,
    the low-level API the other.
    """
    import llama_cpp
    import llama_cpp.llama_cpp as native

    original = native.llama_model_default_params
    keep = [] if not keep_on_cpu else [_cpu_overrides(keep_on_cpu)]
    split = None
    if offload:
        max_devices = int(native.llama_max_devices())
        split = (ctypes.c_float * max_devices)(*offload["tensor_split"])

    def adjusted() -> Any:
        params = original()
        params.use_extra_bufts = enabled
        if keep:
            params.tensor_buft_overrides = ctypes.cast(keep[0], ctypes.c_void_p)
        if progress is not None:
            params.progress_callback = progress
        if offload and split is not None:
            params.n_gpu_layers = offload["n_gpu_layers"]
            params.tensor_split = split
        return params

    native.llama_model_default_params = adjusted
    llama_cpp.llama_model_default_params = adjusted
    try:
        yield
    finally:
        native.llama_model_default_params = original
        llama_cpp.llama_model_default_params = original


def _cpu_overrides(pattern: str) -> Any:
    from meshllm.native import rpc

    return rpc.cpu_overrides(pattern)


def offload_params(stage_layers: Sequence[int]) -> dict[str, Any]:
    """llama.cpp arguments that put `stage_layers[i]` of the last layers on RPC device i.

    llama.cpp counts the output layer as the last offloadable layer and shares layers out
    by their position among all offloaded ones: one more layer, given to the last device,
    lands the output there on paper; HEAD_TENSORS keeps its weights (and so its work) here.
    """
    split = [float(n) for n in stage_layers]
    split[-1] += 1
    return {"n_gpu_layers": sum(stage_layers) + 1, "tensor_split": split}
