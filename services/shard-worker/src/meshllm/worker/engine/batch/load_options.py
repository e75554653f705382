"""How llama.cpp loads a model: options llama-cpp-python does not expose (weight
repacking, tensors kept in this process, layers offloaded to RPC stages, load progress),
held in one frozen value that `model_params` turns into `llama_model_params`.

CPU weight repacking re-lays quantized weights for faster CPU kernels, but a ggml RPC
server cannot repack the layers it receives, so a split model would compute its layers
with other kernels than a whole one and greedy outputs would drift apart after a few dozen
tokens. Off, a model answers the same whole or split: the worker turns it off unless told
otherwise (engine_wire.DEFAULT_WEIGHT_REPACK); `LoadOptions()` keeps llama.cpp's default.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# The head of a split keeps the embeddings and the output layer (tied to the embeddings
# in many models): llama.cpp would otherwise put the output on the last stage, which then
# sends the whole logits vector (vocabulary x 4 bytes, 1 MB for gemma3) back every token.
HEAD_TENSORS = r"^(token_embd|output|output_norm)\.weight$"

PROGRESS_STEP = 0.05  # report load progress every 5% of the weights

ProgressCallback = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_float, ctypes.c_void_p)


@dataclass(frozen=True)
class Offload:
    """Layers on RPC devices: registered RPC devices come first in llama.cpp's device list
    and take the last layers in order; the embeddings, output and first layers stay here."""

    n_gpu_layers: int
    tensor_split: tuple[float, ...]  # share of the offloaded layers on each device

    @classmethod
    def to_stages(cls, stage_layers: Sequence[int]) -> Offload:
        """Puts `stage_layers[i]` of the last layers on RPC device i.

        llama.cpp counts the output layer as the last offloadable layer and shares layers
        out by their position among all offloaded ones: one more layer, given to the last
        device, lands the output there on paper; HEAD_TENSORS keeps its weights (and so
        its work) here.
        """
        split = [float(n) for n in stage_layers]
        split[-1] += 1
        return cls(sum(stage_layers) + 1, tuple(split))


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model; `LoadOptions()` loads it as llama.cpp does by default."""

    repack: bool = True       # CPU weight repacking (llama.cpp's use_extra_bufts)
    keep_on_cpu: str = ""     # a regular expression: tensors that stay in this process
    offload: Offload | None = None
    on_progress: Callable[[float], None] | None = None  # weights loaded, 0..1, every 5%

    @classmethod
    def split_head(cls, stage_layers: Sequence[int], *, repack: bool,
                   on_progress: Callable[[float], None] | None = None) -> LoadOptions:
        """The head of a split: the stages' layers offloaded, the head's tensors kept."""
        return cls(repack, HEAD_TENSORS, Offload.to_stages(stage_layers), on_progress)


@dataclass(frozen=True)
class ModelParams:
    native: Any               # llama_cpp.llama_model_params
    buffers: tuple[Any, ...]  # the ctypes objects `native` points into: alive as long as it


def progress_callback(send: Callable[[float], None]) -> Any:
    """A llama.cpp load-progress callback calling send(fraction) every PROGRESS_STEP."""
    last = [-1.0]

    def report(fraction: float, _: Any) -> bool:
        if fraction - last[0] >= PROGRESS_STEP or fraction >= 1.0:
            last[0] = fraction
            send(round(float(fraction), 3))
        return True  # keep loading

    return ProgressCallback(report)


def model_params(options: LoadOptions) -> ModelParams:
    """llama.cpp's default model parameters with `options` applied."""
    import llama_cpp  # only the engine process loads llama.cpp

    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = options.repack
    buffers: list[Any] = []
    if options.keep_on_cpu:
        from meshllm.native import rpc

        overrides = rpc.cpu_overrides(options.keep_on_cpu)
        params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        buffers.append(overrides)
    if options.offload is not None:
        split = (ctypes.c_float * int(llama_cpp.llama_max_devices()))(
            *options.offload.tensor_split)
        params.n_gpu_layers = options.offload.n_gpu_layers
        params.tensor_split = split
        buffers.append(split)
    if options.on_progress is not None:
        callback = progress_callback(options.on_progress)
        params.progress_callback = callback
        buffers.append(callback)
    return ModelParams(params, tuple(buffers))
