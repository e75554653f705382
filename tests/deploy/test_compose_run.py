"""The compose stack run for real (tests/deploy/compose_run.py), part of `make test`.

It builds the stand-in bases and every CPU image with podman, reusing the llama-cpp-python
wheel `make install` built (about 10 minutes on a new 2-core machine), then runs the stack.
It needs root, and podman or apt to install it (scripts/containers/bases.sh); a machine
without them fails here, saying so, unless MESHLLM_CONTAINER_TESTS=0 skips it explicitly.
MESHLLM_CT_BUILD=0 reuses images already built.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.deploy import compose_run
from tests.deploy.compose_run import Verdict, verdict

ROOT = 0
WITH_PODMAN = {"podman": "/usr/bin/podman", "apt-get": "/usr/bin/apt-get"}
WITH_APT = {"apt-get": "/usr/bin/apt-get"}


@pytest.mark.parametrize(
    ("env", "tools", "euid", "action", "says"),
    [
        ({}, WITH_PODMAN, ROOT, "run", "root, podman"),
        ({"MESHLLM_CONTAINER_TESTS": "1"}, WITH_PODMAN, ROOT, "run", "root, podman"),
        ({}, WITH_APT, ROOT, "run", "installed with apt"),
        ({"MESHLLM_CONTAINER_TESTS": "0"}, {}, 1000, "skip", "MESHLLM_CONTAINER_TESTS=0"),
        ({"MESHLLM_CONTAINER_TESTS": "0"}, WITH_PODMAN, ROOT, "skip", "=0"),
        ({}, {}, ROOT, "fail", "neither podman nor apt-get"),
        ({}, WITH_PODMAN, 1000, "fail", "needs root"),
        ({"MESHLLM_CONTAINER_TESTS": "yes"}, WITH_PODMAN, ROOT, "fail", "'yes'"),
    ],
)
def test_who_runs_the_container_test(env: dict[str, str], tools: dict[str, str], euid: int,
                                     action: str, says: str) -> None:
    found = verdict(env, tools.get, euid)
    assert found.action == action
    assert says in found.reason
    if action == "fail":
        assert "MESHLLM_CONTAINER_TESTS=0" in found.reason or "0 skips" in found.reason


def machine() -> Verdict:
    found = compose_run.machine_verdict()
    if found.action == "skip":
        pytest.skip(f"container test skipped: {found.reason}")
    if found.action == "fail":
        pytest.fail(found.reason, pytrace=False)
    return found


@pytest.mark.timeout(3600)
def test_compose_stack_serves_and_survives_a_lost_worker() -> None:
    machine()
    report = compose_run.run_stack(build=os.environ.get("MESHLLM_CT_BUILD", "1") != "0")
    print(json.dumps({"seconds": report.seconds, "health": report.health}, indent=2))
    assert not report.failures, report.failures
