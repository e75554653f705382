"""`mesh-llm up` as a user runs it: a whole local mesh, then Ctrl-C stops everything."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.procs import free_port

pytestmark = pytest.mark.integration


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def children_of(pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def read_until(proc: subprocess.Popen[str], marker: str, timeout_s: float) -> str:
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not any(marker in line for line in lines):
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    seen = "".join(lines)
    assert marker in seen, f"no {marker!r} in output:\n{seen}"
    return seen


def test_up_serves_and_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    # Some options from the environment; and a per-process variable that, handed on to
    # every service, would make them fight over one metrics port.
    env = {**os.environ, "MESHLLM_UP_WORKERS": "2", "MESHLLM_UP_DATA_DIR": str(tmp_path),
           "MESHLLM_METRICS_PORT": str(metrics_port)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshllm.cli.main", "up", "--port", str(port),
         "--worker-memory", "1GiB", "--blackboard-port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        output = read_until(proc, "Ready: http://localhost", 300)
        assert f"http://localhost:{port}/v1" in output
        assert f"data in {tmp_path.resolve()}" in output
        assert port_is_free(metrics_port)  # no child took up's MESHLLM_METRICS_PORT
        children = children_of(proc.pid)
        assert len(children) == 6  # etcd, planner, blackboard, 2 workers, gateway
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
        assert [m.id for m in client.models.list().data] == ["gemma3-270m"]
        reply = client.chat.completions.create(
            model="gemma3-270m", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
        assert reply.choices[0].message.content is not None
        # the gateway fronts the blackboard node that `up` started
        base = f"http://127.0.0.1:{port}/api/blackboard"
        posted = httpx.post(base + "/posts", json={"author": "test", "text": "hello mesh"})
        assert posted.status_code == 201, posted.text
        feed = httpx.get(base + "/posts").json()["data"]
        assert [p["text"] for p in feed] == ["hello mesh"]
        cli = subprocess.run([sys.executable, "-m", "meshllm.cli.main", "status", "--data-dir",
                              str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert "worker-1" in cli.stdout and "worker-2" in cli.stdout, cli.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        still_running = [pid for pid in children if os.path.exists(f"/proc/{pid}")
                         and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()]
        assert still_running == []
        assert (tmp_path / "logs" / "gateway.log").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
