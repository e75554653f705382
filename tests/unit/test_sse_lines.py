"""Streamed chunks survive clients that split lines with str.splitlines() (httpx's and
requests' iter_lines): the code points it breaks at are escaped, other text stays UTF-8."""

from __future__ import annotations

import json

import pytest
from meshllm.gateway.responses import sse
from meshllm.gateway.responses_events import sse_event

TEXTS = ["a\u2028b", "c\u2029d", "e\x85f", "tab\tand\rcr\nnl\x0bvt\x0cff\x1cfs", "café 漢字 🦙"]


@pytest.mark.parametrize("text", TEXTS)
def test_a_chunk_is_one_line_for_any_splitter(text: str) -> None:
    for wire in (sse({"content": text}),
                 sse_event({"type": "response.output_text.delta", "delta": text})):
        lines = [line for line in wire.decode().splitlines() if line]
        data = [line for line in lines if line.startswith("data: ")]
        assert len(data) == 1 and len(lines) <= 2, lines
        decoded = json.loads(data[0][len("data: "):])
        assert text in (decoded.get("content"), decoded.get("delta"))


def test_other_text_stays_utf8() -> None:
    assert "漢字".encode() in sse({"content": "漢字"})
