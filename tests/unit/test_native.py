"""The ctypes bindings against the real llama.cpp libraries."""

from __future__ import annotations

from meshllm.native import rpc


def test_cpu_device_is_visible_to_llama_cpp() -> None:
    rpc.ensure_backends()
    assert "CPU" in rpc.device_names()


def test_cpu_override_list_is_null_terminated() -> None:
    overrides = rpc.cpu_overrides("^token_embd\\\\.weight$")
    assert overrides[0].pattern == b"^token_embd\\\\.weight$" and overrides[0].buft
    assert overrides[1].pattern is None and overrides[1].buft is None
