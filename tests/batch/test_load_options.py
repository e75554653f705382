"""How the engine process loads its model: the Load command -> BatchConfig and load
options, and load options -> llama.cpp's llama_model_params (no model is loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
from meshllm.common.errors import ConfigError
from meshllm.worker.engine.batch import LoadOptions, Offload, SpecMode
from meshllm.worker.engine.batch.load_options import HEAD_TENSORS, model_params
from meshllm.worker.engine.loading import batch_config
from meshllm.worker.engine_wire import Load


@pytest.mark.parametrize(("stage_layers", "n_gpu_layers", "split"), [
    ((9,), 10, (10.0,)),          # the output layer counts as one more, on the last device
    ((6, 6), 13, (6.0, 7.0)),
    ((4, 3, 2), 10, (4.0, 3.0, 3.0)),
])
def test_offload_gives_the_last_stage_the_output_layer(
        stage_layers: tuple[int, ...], n_gpu_layers: int, split: tuple[float, ...]) -> None:
    assert Offload.to_stages(stage_layers) == Offload(n_gpu_layers, split)


def test_a_whole_model_loads_with_repacking_as_asked() -> None:
    config = batch_config(Load(Path("/m.gguf"), 512, 2, slots=4, max_queue=3))
    assert (config.model_path, config.n_ctx, config.n_slots, config.n_threads,
            config.max_queue) == ("/m.gguf", 2048, 4, 2, 3)
    assert (config.spec_mode, config.draft_model_path) == (SpecMode.NONE, None)
    assert config.load == LoadOptions(repack=False)


def test_a_head_keeps_its_tensors_and_offloads_the_stages() -> None:
    def progress(fraction: float) -> None: ...

    load = Load(Path("/m.gguf"), 512, 1, rpc_endpoints=("a:1", "b:2"), stage_layers=(6, 5),
                weight_repack=True, speculative="draft:/d.gguf")
    config = batch_config(load, progress)
    assert (config.spec_mode, config.draft_model_path) == (SpecMode.DRAFT, "/d.gguf")
    assert config.load == LoadOptions(True, HEAD_TENSORS, Offload(12, (6.0, 6.0)), progress)


@pytest.mark.parametrize(("speculative", "endpoints", "mode"), [
    ("auto", ("a:1",), SpecMode.NGRAM),   # a split's head: each step waits on its stages
    ("auto", (), SpecMode.NONE),          # a model whole: drafts would only cost rows
    ("none", ("a:1",), SpecMode.NONE),    # what was asked wins
    ("ngram", (), SpecMode.NGRAM),
])
def test_auto_speculation_drafts_on_the_head_of_a_split(
        speculative: str, endpoints: tuple[str, ...], mode: SpecMode) -> None:
    load = Load(Path("/m.gguf"), 512, 1, rpc_endpoints=endpoints,
                stage_layers=(9,) * len(endpoints), speculative=speculative)
    assert batch_config(load).spec_mode is mode


def test_stage_layers_must_match_the_endpoints() -> None:
    with pytest.raises(ConfigError):
        batch_config(Load(Path("/m.gguf"), 512, 1, rpc_endpoints=("a:1",), stage_layers=()))


def test_default_options_are_llama_cpp_defaults() -> None:
    import llama_cpp

    default = llama_cpp.llama_model_default_params()
    params = model_params(LoadOptions()).native
    assert params.use_extra_bufts == default.use_extra_bufts
    assert params.n_gpu_layers == default.n_gpu_layers
    assert not params.tensor_buft_overrides and not params.progress_callback


def test_options_become_model_params() -> None:
    seen: list[float] = []
    options = LoadOptions(False, HEAD_TENSORS, Offload(12, (6.0, 6.0)), seen.append)
    made = model_params(options)
    params = made.native
    assert params.use_extra_bufts is False and params.n_gpu_layers == 12
    assert [params.tensor_split[i] for i in range(2)] == [6.0, 6.0]
    assert params.tensor_buft_overrides
    for fraction in (0.0, 0.01, 0.06, 0.5, 1.0):
        assert params.progress_callback(fraction, None)
    assert seen == [0.0, 0.06, 0.5, 1.0]  # every 5% and the end
    assert len(made.buffers) == 3  # the overrides, the split and the callback stay alive


@pytest.mark.parametrize(("endpoints", "rtt_s", "speculative", "groups"), [
    ((), 0.0, "auto", 1),                          # whole
    (("a:1", "b:2"), 0.0004, "auto", 1),           # a split on loopback
    (("a:1", "b:2"), 0.040, "auto", 4),            # 3 stages at +20 ms a hop
    (("a:1", "b:2"), 0.040, "none", 4),
    (("a:1", "b:2"), 0.040, "draft:/d.gguf", 1),   # a draft model drafts for one context
])
def test_a_head_on_slow_links_runs_its_slots_in_groups(
        endpoints: tuple[str, ...], rtt_s: float, speculative: str, groups: int) -> None:
    load = Load(Path("/m.gguf"), 512, 1, rpc_endpoints=endpoints,
                stage_layers=(6,) * len(endpoints), slots=8, speculative=speculative,
                link_rtt_s=rtt_s)
    assert batch_config(load).groups == groups
