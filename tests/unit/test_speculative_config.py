"""Speculative decoding as a per-model planner setting: `auto` (the default) leaves the
choice to each engine (n-gram on the head of a split, engine/loading.speculative_mode)."""

from __future__ import annotations

import pytest
from meshllm.common.errors import ConfigError
from meshllm.common.types import ModelDeclaration, ModelId
from meshllm.planner.config import load_config, speculative_modes
from meshllm.planner.declared import describer


@pytest.mark.parametrize(("entries", "modes"), [
    (["auto"], {"*": "auto"}),
    (["none", "big.gguf=ngram"], {"*": "none", "big.gguf": "ngram"}),
    (["gemma3-270m=draft:small.gguf"], {"gemma3-270m": "draft:small.gguf"}),
])
def test_speculative_modes(entries: list[str], modes: dict[str, str]) -> None:
    assert speculative_modes(entries) == modes


@pytest.mark.parametrize("entry", ["fast", "m=draft", "draft:", "auto:x"])
def test_bad_speculative_entries_name_the_option(entry: str) -> None:
    with pytest.raises(ConfigError, match="--speculative / MESHLLM_SPECULATIVE"):
        speculative_modes([entry])


@pytest.mark.parametrize(("argv", "expected"), [
    ([], "auto"),                                   # the engine decides, by its placement
    (["--speculative", "none"], "none"),
    (["--speculative", "other.gguf=ngram"], "auto"),  # models not named keep the default
    (["--speculative", "none,gemma3-270m=ngram"], "ngram"),
])
def test_the_planner_gives_each_model_its_mode(argv: list[str], expected: str) -> None:
    config = load_config(["--etcd", "http://127.0.0.1:1", *argv], {})
    spec = describer(config)(ModelDeclaration(ModelId("gemma3-270m"), "gemma3-270m"))
    assert spec.speculative == expected
