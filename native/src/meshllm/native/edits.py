"""An edit to vendored C++ source: text that must occur exactly once, and its replacement."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Edit:
    why: str
    anchor: str
    replacement: str


class PatchError(Exception):
    pass


def apply(source: str, edits: tuple[Edit, ...]) -> str:
    """The source with every edit applied; PatchError names the first anchor not found once."""
    for edit in edits:
        count = source.count(edit.anchor)
        if count != 1:
            raise PatchError(
                f"ggml-rpc: the anchor for '{edit.why}' occurs {count} times (expected 1);"
                " llama.cpp changed under this patch: update the edit in meshllm/native/")
        source = source.replace(edit.anchor, edit.replacement)
    return source
