"""The reproducible mode's kernel choices and the config rules around them (no model)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from meshllm.common.errors import ConfigError
from meshllm.worker.engine.batch import BatchConfig, LoadOptions
from meshllm.worker.engine.batch.numerics import (
    FASTEST,
    REPRODUCIBLE,
    TILED_MATMUL_ENV,
    numerics_for,
)


@pytest.mark.parametrize(("deterministic", "flash_attn", "kv", "env"), [
    (True, 1, 8, {TILED_MATMUL_ENV: "0"}),   # row-by-row flash attention over a Q8_0 cache
    (False, -1, 1, {}),                     # llama.cpp's own choices
])
def test_numerics_for(deterministic: bool, flash_attn: int, kv: int,
                      env: dict[str, str]) -> None:
    numerics = numerics_for(deterministic)
    assert numerics.reproducible is deterministic
    assert dict(numerics.process_env()) == env
    params = SimpleNamespace(flash_attn_type=None, type_k=None, type_v=None)
    ggml = SimpleNamespace(GGML_TYPE_F16=1, GGML_TYPE_Q8_0=8)
    numerics.apply_to_context(params, ggml)
    assert (params.flash_attn_type, params.type_k, params.type_v) == (flash_attn, kv, kv)


def test_deterministic_loads_without_repacking_and_passes_its_numerics() -> None:
    config = BatchConfig(model_path="m.gguf", load=LoadOptions(repack=True))
    assert config.deterministic and not config.model_load.repack
    assert config.context(512).numerics == REPRODUCIBLE
    fast = BatchConfig(model_path="m.gguf", load=LoadOptions(repack=True), deterministic=False)
    assert fast.model_load.repack and fast.context(512).numerics == FASTEST


def test_deterministic_refuses_a_unified_kv_cache() -> None:
    with pytest.raises(ConfigError) as err:
        BatchConfig(model_path="m.gguf", kv_unified=True)
    assert err.value.key == "kv_unified"
    assert BatchConfig(model_path="m.gguf", kv_unified=True, deterministic=False).kv_unified
