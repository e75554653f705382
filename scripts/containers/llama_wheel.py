"""Finds the llama-cpp-python wheel this venv was installed from, for the worker image.

`make install` compiles llama.cpp once and pip keeps the wheel in its cache; the container
test hands that wheel to the worker's Dockerfile (build arg LLAMA_CPP_WHEEL) instead of
compiling llama.cpp again inside the image (~20 minutes on 2 cores).

    .venv/bin/python scripts/containers/llama_wheel.py --runtime
        # "3.11 glibc 2.36 x86_64": what a wheel built here needs (also run in the base)
    .venv/bin/python scripts/containers/llama_wheel.py build/wheels --image-runtime "..."
        # copies the wheel there and prints its file name when the image's runtime (the
        # --runtime line run in its base) is this one; exit 1, with the reason on stderr,
        # when there is none to use (the image then compiles llama.cpp from source)

The cache may hold several builds of the same version (other CMAKE_ARGS): the one chosen
is the one whose libllama.so is byte for byte the file installed in this venv.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llama_cpp_python"
LIBRARY = "llama_cpp/lib/libllama.so"


class NoWheel(Exception):
    pass


def runtime() -> str:
    """Python minor version, libc and machine: a wheel from here needs all three to match."""
    libc, version = platform.libc_ver()
    return f"{sys.version_info[0]}.{sys.version_info[1]} {libc} {version} {platform.machine()}"


def mismatch(here: str, image: str) -> str | None:
    """Why a wheel built for runtime `here` cannot go into an image with `image`, or None.
    The wheel's tag (py3-none-linux_x86_64) promises nothing about libc or the CPython its
    libraries were built beside, so only the same minor version, libc and machine count."""
    if here.split() == image.split():
        return None
    return f"the venv's wheel is for {here}, the image has {image or 'nothing it could report'}"


def installed_library() -> tuple[str, str]:
    """(version, sha256 of libllama.so) of the llama-cpp-python installed here."""
    try:
        dist = importlib.metadata.distribution("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError as exc:
        raise NoWheel("llama-cpp-python is not installed in this venv") from exc
    path = Path(str(dist.locate_file(LIBRARY)))
    if not path.exists():
        raise NoWheel(f"{path} is missing from the installed llama-cpp-python")
    return dist.version, hashlib.sha256(path.read_bytes()).hexdigest()


def cached_wheels(version: str) -> list[Path]:
    out = subprocess.run([sys.executable, "-m", "pip", "cache", "list", PACKAGE,
                          "--format=abspath"], capture_output=True, text=True, check=False)
    return [Path(line) for line in out.stdout.split()
            if Path(line).name.startswith(f"{PACKAGE}-{version}-")]


def library_digest(wheel: Path) -> str | None:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return hashlib.sha256(archive.read(LIBRARY)).hexdigest()
    except (KeyError, OSError, zipfile.BadZipFile):
        return None


def find_wheel() -> Path:
    version, digest = installed_library()
    candidates = cached_wheels(version)
    for wheel in candidates:
        if library_digest(wheel) == digest:
            return wheel
    raise NoWheel(f"none of the {len(candidates)} cached {PACKAGE}-{version} wheels holds "
                  "this venv's libllama.so (pip cache purged, or installed another way)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", nargs="?", type=Path, help="folder to copy the wheel into")
    parser.add_argument("--runtime", action="store_true", help="print Python, libc, machine")
    parser.add_argument("--image-runtime", default=None,
                        help="the --runtime line of the image's Python (unchecked if absent)")
    args = parser.parse_args()
    if args.runtime or args.dest is None:
        print(runtime())
        return 0
    try:
        reason = None if args.image_runtime is None else mismatch(runtime(), args.image_runtime)
        if reason:
            raise NoWheel(reason)
        wheel = find_wheel()
    except NoWheel as exc:
        print(f"no llama-cpp-python wheel to reuse: {exc}", file=sys.stderr)
        return 1
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob(f"{PACKAGE}-*.whl"):
        old.unlink()
    shutil.copy2(wheel, args.dest / wheel.name)
    print(wheel.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
