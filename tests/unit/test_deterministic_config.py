"""Reproducible generation as a per-model planner setting, and `mesh-llm up`'s option."""

from __future__ import annotations

import pytest
from meshllm.cli.up_config import load_up_config
from meshllm.common.errors import ConfigError
from meshllm.common.types import ModelDeclaration, ModelId
from meshllm.planner.config import deterministic_modes, load_config
from meshllm.planner.declared import describer


@pytest.mark.parametrize(("entries", "modes"), [
    (["on"], {"*": True}),
    (["off"], {"*": False}),
    (["on", "big.gguf=off"], {"*": True, "big.gguf": False}),
    (["gemma3-270m=off"], {"gemma3-270m": False}),
])
def test_deterministic_modes(entries: list[str], modes: dict[str, bool]) -> None:
    assert deterministic_modes(entries) == modes


@pytest.mark.parametrize("entry", ["yes", "m=maybe", ""])
def test_bad_deterministic_entries_name_the_option(entry: str) -> None:
    with pytest.raises(ConfigError, match="--deterministic / MESHLLM_DETERMINISTIC"):
        deterministic_modes([entry])


@pytest.mark.parametrize(("argv", "expected"), [
    ([], True),                                    # on by default
    (["--deterministic", "off"], False),
    (["--deterministic", "on,gemma3-270m=off"], False),
    (["--deterministic", "off,gemma3-270m=on"], True),
])
def test_the_planner_gives_each_model_its_setting(argv: list[str], expected: bool) -> None:
    config = load_config(["--etcd", "http://127.0.0.1:1", *argv], {})
    spec = describer(config)(ModelDeclaration(ModelId("gemma3-270m"), "gemma3-270m"))
    assert spec.deterministic is expected


def test_up_passes_its_setting_and_refuses_a_bad_one() -> None:
    assert load_up_config([], {}).deterministic == ("on",)
    assert load_up_config(["--deterministic", "off"], {}).deterministic == ("off",)
    with pytest.raises(ConfigError, match="--deterministic"):
        load_up_config(["--deterministic", "sometimes"], {})
