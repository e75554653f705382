"""Processes of a split for benchmarks and tests: ggml RPC stage servers and a head
(bench/split_head.py) in child processes, the head driven over its pipes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.procs import free_port, port_open, wait_until

HEAD = Path(__file__).resolve().parent / "split_head.py"


class HeadProcess:
    """bench/split_head.py in a child process: `endpoints` empty runs the model whole."""

    def __init__(self, endpoints: Sequence[str], layers: Sequence[int], *,
                 speculative: str = "none", draft_max: int = 4, threads: int = 2,
                 slots: int = 8, link_rtt_ms: float = 0.0, pad_drafts: bool = False,
                 groups: int = 1, env: Mapping[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HEAD), ",".join(endpoints), ",".join(map(str, layers)),
             "--speculative", speculative, "--draft-max", str(draft_max), "--threads",
             str(threads), "--slots", str(slots), "--link-rtt-ms", str(link_rtt_ms),
             "--pad-drafts", "on" if pad_drafts else "off", "--groups", str(groups)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env=None if env is None else dict(env))
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "loaded":
            self.close()
            raise RuntimeError(f"the head did not load: {line!r}")

    def run(self, prompts: Sequence[str], max_tokens: int,
            link_rtt_ms: float | None = None) -> dict[str, Any]:
        """Runs the prompts as concurrent greedy requests (see split_head.run)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        job: dict[str, Any] = {"prompts": list(prompts), "max_tokens": max_tokens}
        if link_rtt_ms is not None:
            job["link_rtt_ms"] = link_rtt_ms
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the head died")
        return dict(json.loads(line))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_stage(cache: Path, threads: int = 2,
                env: Mapping[str, str] | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """A ggml RPC server on a free loopback port; (process, port). By default it computes
    with the kernels of deterministic generation, as the worker starts a stage for it."""
    from meshllm.worker.engine.batch.numerics import REPRODUCIBLE

    port = free_port()
    env = env if env is not None else {**os.environ, **REPRODUCIBLE.process_env()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshllm.worker.rpc_server", "--endpoint", f"127.0.0.1:{port}",
         "--cache-dir", str(cache), "--threads", str(threads)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(env))
    wait_until(lambda: port_open(port), 30, "RPC server")
    return proc, port
