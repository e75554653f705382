"""Shared helpers for the deployment tests: paths, YAML loading and the validation tools.

The tools (check-jsonschema, hadolint, helm-python-sdk, kubernetes-validate) come from
requirements-deploy.txt and are installed into the same environment as pytest, so they
are looked up next to the running interpreter rather than on PATH.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "mesh-llm"
COMPOSE_FILE = REPO / "docker-compose.yml"
BACKENDS = ("cpu", "cuda", "rocm", "vulkan")
DOCKERFILES = {
    "gateway": REPO / "services" / "gateway" / "Dockerfile",
    "planner": REPO / "services" / "planner" / "Dockerfile",
    "blackboard": REPO / "services" / "blackboard" / "Dockerfile",
    "shard-worker": REPO / "services" / "shard-worker" / "Dockerfile",
}


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def tool(name: str) -> str:
    """The console script `name` installed beside this interpreter."""
    path = Path(sysconfig.get_path("scripts")) / name
    assert path.exists(), f"{name} missing: pip install -r requirements-deploy.txt"
    return str(path)


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def duration_seconds(text: str) -> int:
    """Seconds in a compose duration such as '1m30s' or '15m'."""
    units = {"h": 3600, "m": 60, "s": 1}
    total, number = 0, ""
    for char in text:
        if char.isdigit():
            number += char
        else:
            total += int(number) * units[char]
            number = ""
    assert not number, f"duration without unit: {text!r}"
    return total
