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
import pexpect
import pytest
from meshllm.cli.procs import STOP_GRACE_S

from tests.integration.up_process import (
    MESH_LLM,
    UpProcess,
    alive,
    command_of,
    descendants_of,
    holds_model,
    pids_mentioning,
    still_alive,
)
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


# --- readiness, signals and orphans, through the installed `mesh-llm` ------------------

SMALL = ("--worker-memory", "64MiB")  # gemma3-270m needs about 400 MiB: fits nowhere


def test_up_says_a_model_is_not_served_and_require_models_fails(tmp_path: Path) -> None:
    up = UpProcess(tmp_path, *SMALL, "--require-models")
    try:
        up.wait_for("starting services", 60)
        while up.popen.poll() is None and "Ready, but" not in up.output:
            up.tree()  # note every pid while they run
            time.sleep(0.2)
        assert up.popen.wait(60) == 1
        output = up.wait_for("mesh-llm up: --require-models: gemma3-270m not served")
        assert "\nstopped\n" in output
        assert "Ready, but gemma3-270m is not served: needs" in output
        assert "Ready: http" not in output
        assert output.index("Ready, but") < output.index("stopping the mesh...")
        assert still_alive(up.seen, 5) == []
    finally:
        up.kill_everything()


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
def test_a_hang_up_or_terminate_stops_every_child(tmp_path: Path, signum: signal.Signals
                                                  ) -> None:
    # Budgets too small: no model loads, so the mesh is up in seconds; without
    # --require-models `up` keeps serving and says what is missing.
    up = UpProcess(tmp_path, *SMALL)
    try:
        up.wait_for("Ready, but gemma3-270m is not served", 120)
        children = up.tree()
        engines = [p for p in children if "meshllm.worker.engine" in command_of(p)]
        # 6 services, and each worker's engine process started ahead of its first load
        assert (len(children), len(engines)) == (8, 2), [command_of(p) for p in children]
        up.signal(signum)
        assert up.popen.wait(STOP_GRACE_S + 10) == 0
        assert "stopping the mesh..." in up.wait_for("stopped")
        assert still_alive(children, 2) == []
    finally:
        up.kill_everything()


def test_killing_the_launcher_outright_leaves_no_process_behind(tmp_path: Path) -> None:
    up = UpProcess(tmp_path, "--worker-memory", "1GiB")
    try:
        up.wait_for("Ready: http://localhost", 300)
        tree = up.tree()
        engines = [p for p in tree if "meshllm.worker.engine" in command_of(p)]
        # per worker one serving (or still loading: Ready needs one replica) and one
        # started ahead of the next load, which may be starting still
        assert 2 <= len(engines) <= 4 and any(holds_model(p) for p in engines), [
            command_of(p) for p in tree]
        up.signal(signal.SIGKILL)
        up.popen.wait(10)
        assert [command_of(p) for p in still_alive(tree, 15)] == []
    finally:
        up.kill_everything()


def test_ctrl_c_in_a_terminal_stops_the_mesh_even_through_tee(tmp_path: Path) -> None:
    # `make up | tee log`: the Ctrl-C reaches tee too, so the launcher's stdout breaks
    # while it says "stopping the mesh..."; that must not cut the shutdown short.
    command = (f"{MESH_LLM} up --port {free_port()} --blackboard-port {free_port()} "
               f"--data-dir {tmp_path} {' '.join(SMALL)} 2>&1 | tee {tmp_path / 'log'}")
    shell = pexpect.spawn("bash", ["-c", command], encoding="utf-8", timeout=120)
    tree: set[int] = set()
    try:
        shell.expect("Ready, but gemma3-270m is not served")
        assert shell.pid is not None
        tree = descendants_of(shell.pid)
        services = [p for p in tree if "meshllm." in command_of(p) or "etcd" in command_of(p)]
        engines = [p for p in services if "meshllm.worker.engine" in command_of(p)]
        # 6 services, and each worker's engine process started ahead of its first load
        assert (len(services), len(engines)) == (8, 2), [command_of(p) for p in tree]
        shell.sendintr()
        shell.expect(pexpect.EOF)
        assert [command_of(p) for p in still_alive(tree, STOP_GRACE_S + 5)] == []
        assert "Traceback" not in (tmp_path / "log").read_text()
    finally:
        shell.close(force=True)
        for pid in tree | pids_mentioning(str(tmp_path)):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
