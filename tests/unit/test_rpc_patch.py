"""The edits that make mesh-llm's ggml-rpc, applied to the real vendored sources and to
made-up ones (an anchor that moved or repeats must stop the build, naming the edit)."""

from __future__ import annotations

import subprocess

import pytest
from meshllm.native import build, rpc, rpc_patch
from meshllm.native.rpc_patch import Edit, PatchError

EDITS = (Edit("first", "alpha", "ALPHA"), Edit("second", "beta", "BETA"))


@pytest.mark.parametrize(("source", "result", "problem"), [
    ("alpha beta", "ALPHA BETA", ""),
    ("beta alpha gamma", "BETA ALPHA gamma", ""),
    ("alpha", "", "'second' occurs 0 times"),
    ("alpha beta beta", "", "'second' occurs 2 times"),
    ("", "", "'first' occurs 0 times"),
])
def test_apply(source: str, result: str, problem: str) -> None:
    if problem:
        with pytest.raises(PatchError, match=problem):
            rpc_patch.apply(source, EDITS)
    else:
        assert rpc_patch.apply(source, EDITS) == result


def test_every_edit_changes_its_source() -> None:
    for edit in (*rpc_patch.EDITS, *rpc_patch.TRANSPORT_EDITS):
        assert edit.anchor != edit.replacement, edit.why


def test_built_library_exports_only_the_ggml_rpc_api() -> None:
    """Hidden internals are what let it live beside the stock library in one process."""
    path = rpc.MESHLLM_LIBRARY
    assert path.exists(), "make install builds it (python -m meshllm.native.build)"
    assert (path.parent / f"{build.LIB_NAME}.fingerprint").exists()
    out = subprocess.run(["nm", "-D", "--defined-only", str(path)], check=True,
                         capture_output=True, text=True).stdout
    functions = {line.split()[-1] for line in out.splitlines() if " T " in line}
    assert "ggml_backend_rpc_add_server" in functions
    assert "ggml_backend_rpc_start_server" in functions
    assert all(name.startswith("ggml_backend_") for name in functions), functions
