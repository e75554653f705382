"""scripts/containers/llama_wheel.py: which llama-cpp-python wheel the worker image reuses.

The container test's worker image installs the wheel `make install` built instead of
compiling llama.cpp again, only when the image's Python, libc and machine are the venv's.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.deploy.deploytools import REPO

SCRIPT = REPO / "scripts" / "containers" / "llama_wheel.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("llama_wheel", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wheel_tool = load()
HERE = "3.11 glibc 2.36 x86_64"


@pytest.mark.parametrize(
    ("image", "reusable"),
    [
        (HERE, True),
        ("3.11  glibc 2.36 x86_64\n", True),  # as read back from `podman run`
        ("3.12 glibc 2.36 x86_64", False),   # another CPython beside the libraries
        ("3.11 glibc 2.31 x86_64", False),   # an older libc than the wheel was linked with
        ("3.11 glibc 2.36 aarch64", False),
        ("", False),                          # the base image could not be run
    ],
)
def test_a_wheel_is_reused_only_in_the_same_runtime(image: str, reusable: bool) -> None:
    reason = wheel_tool.mismatch(HERE, image)
    assert (reason is None) == reusable
    if reason:
        assert HERE in reason


def test_runtime_names_this_python() -> None:
    words = wheel_tool.runtime().split()
    assert words[0] == f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert len(words) == 4


def test_another_runtime_copies_nothing_and_says_why(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "wheels"),
                          "--image-runtime", "3.99 glibc 9.99 x86_64"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 1 and out.stdout == ""
    assert "the image has 3.99 glibc 9.99 x86_64" in out.stderr
    assert not (tmp_path / "wheels").exists()


def test_the_chosen_wheel_holds_the_installed_library(tmp_path: Path) -> None:
    try:
        wheel = wheel_tool.find_wheel()
    except wheel_tool.NoWheel as exc:
        pytest.skip(f"the worker image will compile llama.cpp: {exc}")
    _, installed = wheel_tool.installed_library()
    assert wheel_tool.library_digest(wheel) == installed
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path),
                          "--image-runtime", wheel_tool.runtime()],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == wheel.name
    assert (tmp_path / wheel.name).read_bytes() == wheel.read_bytes()
