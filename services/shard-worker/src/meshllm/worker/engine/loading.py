"""The model the engine process serves, from its Load command: the one place where the
wire's engine settings become the batching engine's configuration."""

from __future__ import annotations

from collections.abc import Callable

from meshllm.common.errors import ConfigError
from meshllm.worker.engine.batch import BatchConfig, BatchEngine, LoadOptions, SpecMode
from meshllm.worker.engine.batch.groups import groups_for_link
from meshllm.worker.engine_wire import Load


def load_options(load: Load, on_progress: Callable[[float], None] | None) -> LoadOptions:
    if not load.rpc_endpoints:
        return LoadOptions(repack=load.weight_repack, on_progress=on_progress)
    if len(load.stage_layers) != len(load.rpc_endpoints):
        raise ConfigError("stage_layers", f"{len(load.stage_layers)} layer counts for "
                          f"{len(load.rpc_endpoints)} RPC endpoints")
    return LoadOptions.split_head(load.stage_layers, repack=load.weight_repack,
                                  on_progress=on_progress)


def speculative_mode(load: Load) -> str:
    """`auto` is n-gram drafting on the head of a split, where every step waits a round
    trip per stage and a verified run of drafts shares one (the draft tuner keeps it off
    while it does not pay); nothing on a model served whole, whose rows it would cost."""
    if load.speculative != "auto":
        return load.speculative
    return SpecMode.NGRAM.value if load.rpc_endpoints else SpecMode.NONE.value


def batch_config(load: Load, on_progress: Callable[[float], None] | None = None
                 ) -> BatchConfig:
    """Each slot gets the model's whole context. A split's head over slow links runs its
    slots in groups (batch/groups.py), unless a draft model drafts for them."""
    mode, _, draft = speculative_mode(load).partition(":")
    groups = (1 if draft else
              groups_for_link(load.slots, load.link_rtt_s, len(load.rpc_endpoints)))
    return BatchConfig(
        model_path=str(load.model_path), n_ctx=load.context_length_tokens * load.slots,
        n_slots=load.slots, n_threads=load.threads, max_queue=load.max_queue,
        spec_mode=SpecMode(mode), draft_model_path=draft or None,
        chat_template=load.chat_template, deterministic=load.deterministic,
        link_rtt_s=load.link_rtt_s, load=load_options(load, on_progress), groups=groups,
    )


def load_engine(load: Load, on_progress: Callable[[float], None] | None = None
                ) -> BatchEngine:
    """Registers the split's RPC stages, if any, and loads the model."""
    from meshllm.native import rpc  # imported here: only the engine process needs llama.cpp

    config = batch_config(load, on_progress)
    rpc.ensure_backends()
    if load.rpc_endpoints:
        library = rpc.RpcLibrary(load.rpc_library)
        rpc.add_rpc_servers(list(load.rpc_endpoints), library)
        if config.groups > 1 and library is rpc.RpcLibrary.MESHLLM:
            # Groups share each stage's one connection: pipelined, a group's request goes
            # out while another's reply is awaited (the stock library sends them in turn).
            rpc.set_pipelined(list(load.rpc_endpoints))
    return BatchEngine(config)
