"""The record `mesh-llm up` leaves for `mesh-llm status`."""

from __future__ import annotations

from pathlib import Path

import pytest
from meshllm.cli.local_mesh import FILE_NAME, LocalMesh, read_local_mesh
from meshllm.common.errors import InvalidRecord


def test_round_trip(tmp_path: Path) -> None:
    LocalMesh("http://127.0.0.1:40001", 9337).write(tmp_path)
    assert read_local_mesh(tmp_path) == LocalMesh("http://127.0.0.1:40001", 9337)


def test_no_record_is_none(tmp_path: Path) -> None:
    assert read_local_mesh(tmp_path) is None


@pytest.mark.parametrize("text", [
    "not json", "[]", '{"etcd": "http://x"}', '{"etcd": 5, "port": 9337}',
    '{"etcd": "http://x", "port": "9337"}', '{"etcd": "http://x", "port": true}',
])
def test_a_damaged_record_is_refused_naming_the_file(tmp_path: Path, text: str) -> None:
    (tmp_path / FILE_NAME).write_text(text)
    with pytest.raises(InvalidRecord, match=FILE_NAME):
        read_local_mesh(tmp_path)
