"""The code base keeps its shape: small modules and functions, the environment read only
by config loaders, and dependencies pointing one way (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GENERATED = REPO / "common/src/meshllm/v1"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 40

# Where each installable part keeps its `meshllm.*` packages.
PARTS = {
    "common": REPO / "common/src/meshllm/common",
    "native": REPO / "native/src/meshllm/native",
    "gateway": REPO / "services/gateway/src/meshllm/gateway",
    "planner": REPO / "services/planner/src/meshllm/planner",
    "worker": REPO / "services/shard-worker/src/meshllm/worker",
    "blackboard": REPO / "services/blackboard/src/meshllm/blackboard",
    "cli": REPO / "launcher/src/meshllm/cli",
}
SERVICES = ("gateway", "planner", "worker", "blackboard")
# What each part may import from mesh-llm itself (besides itself and generated code).
ALLOWED = {
    "common": set(),
    "native": {"common"},
    **{service: {"common", "native"} for service in SERVICES},
    "cli": {"common", "native", *SERVICES},
}
# The one function that reads the process environment; services get it passed down.
ENV_READERS = {
    ("common/src/meshllm/common/config.py", "process_env"),
    # Not configuration: native libraries' switches that only the environment can set,
    # written before they compute (batch/numerics.py says why).
    ("common/src/meshllm/common/config.py", "export_to_process"),
}


@dataclass(frozen=True)
class Source:
    path: Path
    tree: ast.Module
    lines: int

    @property
    def name(self) -> str:
        return str(self.path.relative_to(REPO))


def _sources(*roots: Path) -> list[Source]:
    found = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if GENERATED in path.parents:
                continue
            text = path.read_text()
            found.append(Source(path, ast.parse(text), text.count("\n")))
    return found


SHIPPED = _sources(*PARTS.values())
TOOLS = _sources(REPO / "bench", REPO / "scripts")


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _enclosing_function(tree: ast.AST, target: ast.AST) -> str:
    for function in _functions(tree):
        if any(node is target for node in ast.walk(function)):
            return function.name
    return "<module>"


def test_modules_are_small() -> None:
    big = [f"{s.name}: {s.lines} lines" for s in SHIPPED + TOOLS if s.lines > MAX_MODULE_LINES]
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_functions_are_short() -> None:
    long = [f"{s.name}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
            for s in SHIPPED + TOOLS for f in _functions(s.tree)
            if f.end_lineno is not None and f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def _environment_reads(source: Source) -> Iterator[str]:
    for node in ast.walk(source.tree):
        hit = (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb")
               and isinstance(node.value, ast.Name) and node.value.id == "os")
        hit = hit or (isinstance(node, ast.ImportFrom) and node.module == "os"
                      and any(a.name in ("environ", "getenv") for a in node.names))
        if hit:
            yield _enclosing_function(source.tree, node)


def test_environment_is_read_only_by_config_loaders() -> None:
    reads = [f"{s.name} in {function}" for s in SHIPPED for function in _environment_reads(s)
             if (s.name, function) not in ENV_READERS]
    assert not reads, f"environment read outside the config loaders: {reads}"


def _imported_parts(source: Source) -> Iterator[tuple[str, str]]:
    for node in ast.walk(source.tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "meshllm" and len(parts) > 1 and parts[1] in PARTS:
                yield parts[1], name


@pytest.mark.parametrize("part", sorted(PARTS))
def test_dependencies_point_one_way(part: str) -> None:
    """Services use the shared code, the shared code never imports a service, and only
    the launcher knows every service."""
    allowed = ALLOWED[part] | {part}
    bad = [f"{s.name} imports {name}" for s in _sources(PARTS[part])
           for imported, name in _imported_parts(s) if imported not in allowed]
    assert not bad, bad


def test_engine_child_stays_inside_its_package() -> None:
    """Code that runs in the engine child process imports the engine wire and its own
    package, never the worker service around it."""
    engine = PARTS["worker"] / "engine"
    allowed = ("meshllm.worker.engine", "meshllm.worker.engine_wire")
    bad = [f"{s.name} imports {name}" for s in _sources(engine)
           for part, name in _imported_parts(s)
           if part == "worker" and not any(name == a or name.startswith(a + ".")
                                           for a in allowed)]
    assert not bad, bad
