"""Dockerfiles: hadolint-clean, pinned bases, non-root, health-checked, no models inside.

No Docker engine runs here, so nothing is built; these checks read the files. hadolint
covers the general rules, our parser the project's own (a hadolint rule cannot know that
`builder-${BACKEND}` names one of our stages).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deploy.deploytools import BACKENDS, DOCKERFILES, REPO, run, tool

WORKER = DOCKERFILES["shard-worker"]


@dataclass
class Stage:
    base: str                      # the FROM image, build args not yet substituted
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def logical_lines(text: str) -> list[str]:
    """Instructions with backslash continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    return lines


def parse(path: Path) -> Dockerfile:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
        elif keyword == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default.strip('"')
    return Dockerfile(args, stages)


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


def test_hadolint_finds_nothing() -> None:
    # .hadolint.yaml sets failure-threshold "style": every finding fails this test.
    config = REPO / ".hadolint.yaml"
    paths = [str(p) for p in DOCKERFILES.values()]
    result = run([tool("hadolint"), "--config", str(config), "--format", "json", *paths])
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and findings == [], json.dumps(findings, indent=1)


def test_every_ignored_rule_says_why() -> None:
    lines = (REPO / ".hadolint.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s+- DL\d+", line):
            assert lines[i - 1].strip().startswith("#"), f"no reason given for {line.strip()}"


@pytest.mark.parametrize("service", DOCKERFILES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_base_images_are_pinned(service: str, backend: str) -> None:
    parsed = parse(DOCKERFILES[service])
    args = {**parsed.global_args, "BACKEND": backend}
    names = {s.name for s in parsed.stages}
    for stage in parsed.stages:
        base = substitute(stage.base, args)
        if base in names:
            continue
        image, _, tag = base.rpartition(":")
        assert image and tag and tag != "latest", f"{service}: unpinned base {base}"
        assert re.search(r"\d", tag), f"{service}: tag without a version: {base}"


@pytest.mark.parametrize("service", DOCKERFILES)
def test_final_stage_runs_as_non_root_with_healthcheck(service: str) -> None:
    final = parse(DOCKERFILES[service]).stages[-1]
    users = final.all("USER")
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert users[-1].split(":")[0].isdigit(), "numeric USER lets runAsNonRoot verify it"
    assert final.all("HEALTHCHECK") and final.all("ENTRYPOINT")
    assert any("/opt/venv" in c for c in final.all("COPY")), "runtime must copy the venv"


@pytest.mark.parametrize("service", DOCKERFILES)
def test_protos_are_generated_in_the_builder(service: str) -> None:
    builder = parse(DOCKERFILES[service]).stage("builder")
    runs = " ".join(builder.all("RUN"))
    assert "scripts/gen_protos.py" in runs and "grpcio-tools==1.85.1" in runs
    assert "./common" in runs and "-e " not in runs, "non-editable installs only"


@pytest.mark.parametrize("service", DOCKERFILES)
def test_no_models_in_images(service: str) -> None:
    for stage in parse(DOCKERFILES[service]).stages:
        for copied in stage.all("COPY") + stage.all("ADD"):
            assert ".gguf" not in copied and "models" not in copied, copied
        assert not any("gguf" in r for r in stage.all("RUN") if "pip install" in r)


@pytest.mark.parametrize("service", ["gateway", "planner", "blackboard"])
def test_small_images_have_no_llama_cpp(service: str) -> None:
    assert "llama" not in DOCKERFILES[service].read_text().lower()


@pytest.mark.parametrize("backend", BACKENDS)
def test_worker_has_a_builder_and_runtime_per_backend(backend: str) -> None:
    parsed = parse(WORKER)
    names = {s.name for s in parsed.stages}
    assert {f"builder-{backend}", f"runtime-{backend}"} <= names
    assert parsed.global_args["BACKEND"] == "cpu", "the default build is the portable CPU one"


def test_worker_builds_llama_cpp_portably_with_rpc() -> None:
    parsed = parse(WORKER)
    text = " ".join(parsed.stage("builder").all("RUN") + parsed.stage("builder").all("ARG"))
    for flag in ("-DGGML_RPC=ON", "-DLLAVA_BUILD=OFF", "-DGGML_NATIVE=OFF",
                 "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON"):
        assert flag in text, flag
    assert "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" in text
    assert parsed.stage("builder").all("ARG")[0] == "LLAMA_CPP_PYTHON_VERSION=0.3.36"


@pytest.mark.parametrize(
    ("backend", "builder_base", "runtime_base", "flag"),
    [
        ("cuda", "-devel-", "-runtime-", "-DGGML_CUDA=on"),
        ("rocm", "-complete", "rocm/dev-ubuntu", "-DGGML_HIP=on"),
        ("vulkan", "UBUNTU_IMAGE", "UBUNTU_IMAGE", "-DGGML_VULKAN=on"),
    ],
)
def test_gpu_backends_compile_and_run_on_their_images(
    backend: str, builder_base: str, runtime_base: str, flag: str
) -> None:
    parsed = parse(WORKER)
    builder, runtime = parsed.stage(f"builder-{backend}"), parsed.stage(f"runtime-{backend}")
    assert builder_base in builder.base and runtime_base in runtime.base
    assert flag in " ".join(builder.all("ENV"))
    if backend == "rocm":
        assert "-complete" not in runtime.base, "the runtime needs no ROCm compilers"


def test_dockerignore_keeps_the_context_small() -> None:
    rules = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "allow-list: everything not named is excluded (.venv, .git)"
    assert {"!protos/", "!scripts/gen_protos.py", "!common/", "!services/"} <= set(rules)
    assert {"**/*.gguf", "common/src/meshllm/v1/", "**/*.egg-info"} <= set(rules)
