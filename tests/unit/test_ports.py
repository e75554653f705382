"""Ports picked for servers: below the ephemeral range, never the same twice in a row."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest
from meshllm.common.ports import POOL_LOW, PortPicker, ephemeral_low


@pytest.mark.parametrize(("text", "low"), [
    ("32768\t60999\n", 32768),
    ("40000 65000", 40000),
    ("", 32768),          # unreadable: the kernel's default
    ("garbage", 32768),
])
def test_ephemeral_low(tmp_path: Path, text: str, low: int) -> None:
    path = tmp_path / "range"
    path.write_text(text)
    assert ephemeral_low(path) == low


def test_missing_range_file_means_the_default(tmp_path: Path) -> None:
    assert ephemeral_low(tmp_path / "absent") == 32768


def test_picks_stay_below_the_ephemeral_range_and_do_not_repeat(tmp_path: Path) -> None:
    path = tmp_path / "range"
    path.write_text("32768 60999")
    picker = PortPicker(range_file=path, rng=random.Random(7))
    picks = [picker.pick() for _ in range(200)]
    assert len(set(picks)) == len(picks)
    assert all(POOL_LOW <= port < 32768 for port in picks)


def test_a_port_in_use_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "range"
    path.write_text("32768 60999")
    first = PortPicker(range_file=path, rng=random.Random(3)).pick()
    with socket.socket() as held:
        held.bind(("127.0.0.1", first))
        held.listen()
        again = PortPicker(range_file=path, rng=random.Random(3)).pick()
    assert again != first and POOL_LOW <= again < 32768


def test_no_room_below_the_range_falls_back_to_the_kernel(tmp_path: Path) -> None:
    path = tmp_path / "range"
    path.write_text("20500 60999")  # 500 ports below: too few to cycle through
    port = PortPicker(range_file=path).pick()
    assert 0 < port < 65536
