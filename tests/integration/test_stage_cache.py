"""A stage whose worker can read the model file fills its cache from it (stage_cache), and
the head's load then sends hashes, not weights.

Real processes: a ggml RPC stage server behind a proxy that counts the bytes the head sends
it, and a head engine (bench/split_head.py) holding gemma3-270m's first 9 layers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from meshllm.common import models
from meshllm.worker.stage_cache import covered

from bench.split_procs import HeadProcess, start_stage
from bench.split_profile import ParsingProxy

STAGE_LAYERS = 9  # of 18: layers 9-17


def head_load_bytes(cache: Path) -> int:
    """Bytes the head sends the stage while it loads the model, with `cache` as the
    stage server's cache directory."""
    proc, port = start_stage(cache, threads=1)
    try:
        proxy = ParsingProxy(port)
        head = HeadProcess([f"127.0.0.1:{proxy.port}"], [STAGE_LAYERS], threads=1, slots=1)
        head.close()
        return proxy.reset().to_server
    finally:
        proc.kill()
        proc.wait()


def entries(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir() if not p.name.startswith("index-")}


def test_a_primed_stage_receives_hashes_not_weights(tmp_path: Path) -> None:
    model = models.materialize("gemma3-270m")
    uploaded, primed = tmp_path / "uploaded", tmp_path / "primed"
    cold = head_load_bytes(uploaded)  # the server keeps what the head sent in full
    subprocess.run([sys.executable, "-m", "meshllm.worker.stage_cache", "--model", str(model),
                    "--cache-dir", str(primed), "--layers", "9:18"], check=True,
                   stdout=subprocess.DEVNULL)
    assert entries(primed) == entries(uploaded)  # same names: same hashes of same bytes
    for name in entries(uploaded):
        assert (primed / name).read_bytes() == (uploaded / name).read_bytes()
    assert covered(model, primed, 9, 18) and not covered(model, primed, 8, 18)
    before = entries(primed)
    warm = head_load_bytes(primed)
    assert entries(primed) == before  # the server saved nothing: every offer was a hit
    assert cold > 30_000_000 and warm < cold / 50, (cold, warm)
    print(f"head load sent the stage {cold / 1e6:.1f} MB cold, {warm / 1e6:.2f} MB primed")
