"""`python -m meshllm.native.build`: compile mesh-llm's ggml RPC library.

It is ggml-rpc from the exact llama.cpp revision that the installed llama-cpp-python
vendors, with the client change in `rpc_patch.py`, linked against that package's own
`libggml-base.so.0`. Its symbols stay private (hidden visibility, -Bsymbolic), so it lives
beside the stock `libggml-rpc.so.0` without either one binding to the other's internals.
The sources come from the package's sdist (the only place that revision is published),
downloaded once into the work folder. Takes a few seconds; skipped when up to date.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from meshllm.common.config import process_env
from meshllm.native import rpc_patch

PACKAGE = "llama-cpp-python"
LIB_NAME = "libmeshllm-ggml-rpc.so"
OUTPUT_DIR = Path(__file__).resolve().parent / "lib"
GGML = "vendor/llama.cpp/ggml/"
CXX_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fvisibility=hidden",
             "-fvisibility-inlines-hidden", "-Wl,-Bsymbolic", "-DGGML_SHARED",
             "-DGGML_BACKEND_SHARED", "-DGGML_BACKEND_BUILD", "-DGGML_BUILD")


class BuildError(Exception):
    pass


def say(message: str) -> None:
    print(f"[native] {message}", flush=True)


def installed_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise BuildError(f"{PACKAGE} is not installed: run `make install` first") from exc


def llama_lib_dir() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).resolve().parent / "lib"


def sdist(version: str, work: Path) -> Path:
    """The sdist tarball, downloaded into `work` unless already there."""
    archive = work / f"llama_cpp_python-{version}.tar.gz"
    if archive.exists():
        return archive
    say(f"downloading the {PACKAGE} {version} sdist for the ggml-rpc sources")
    work.mkdir(parents=True, exist_ok=True)
    # Only this package as source: ":all:" would build every one of its build
    # dependencies from source too, recursively (minutes, inside an image build).
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--no-binary", PACKAGE, f"{PACKAGE}=={version}", "-d", str(work)],
                   check=True)
    if not archive.exists():
        raise BuildError(f"pip download did not produce {archive.name} in {work}")
    return archive


def wanted(name: str) -> bool:
    """ggml's public and internal headers and the ggml-rpc sources: nothing else is compiled."""
    _, _, rest = name.partition(GGML)
    return bool(rest) and (rest.startswith(("include/", "src/ggml-rpc/"))
                           or (rest.startswith("src/") and rest.count("/") == 1
                               and rest.endswith(".h")))


def extract(archive: Path, dest: Path) -> Path:
    """Unpack the headers and ggml-rpc sources; returns the llama.cpp root under `dest`."""
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if wanted(m.name)]
        if not members:
            raise BuildError(f"{archive.name} holds no vendor/llama.cpp/ggml sources")
        unsafe = [m.name for m in members if not (m.isfile() or m.isdir())
                  or m.name.startswith("/") or ".." in Path(m.name).parts]
        if unsafe:
            raise BuildError(f"{archive.name} holds unsafe entries: {unsafe[:3]}")
        # The "data" filter exists from Python 3.11.4 (Debian 12 has 3.11.2); the members
        # were vetted above either way.
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **safe)  # type: ignore[arg-type]
    root = dest / members[0].name.split("/")[0] / "vendor" / "llama.cpp"
    if not (root / "ggml/src/ggml-rpc/ggml-rpc.cpp").exists():
        raise BuildError(f"ggml-rpc.cpp missing from {archive.name}")
    return root


def fingerprint(version: str, source: str, compiler: str) -> str:
    digest = hashlib.sha256()
    for part in (version, source, " ".join(CXX_FLAGS), compiler):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def compile_library(root: Path, sources: list[Path], output: Path, compiler: str) -> None:
    if shutil.which(compiler) is None:
        raise BuildError(f"no C++ compiler '{compiler}' on PATH: install g++ or pass --cxx")
    lib_dir = llama_lib_dir()
    command = [compiler, *CXX_FLAGS, "-I", str(root / "ggml/include"), "-I", str(root / "ggml/src"),
               "-I", str(root / "ggml/src/ggml-rpc"), *map(str, sources), "-L", str(lib_dir),
               "-l:libggml-base.so.0", "-lpthread", f"-Wl,-rpath,{lib_dir}", "-o", str(output)]
    subprocess.run(command, check=True)


def build(work: Path, force: bool = False, compiler: str = "g++") -> Path:
    started = time.monotonic()
    version = installed_version()
    root = extract(sdist(version, work), work / "src")
    rpc_dir = root / "ggml/src/ggml-rpc"
    patched = {name: rpc_patch.apply((rpc_dir / name).read_text(), edits)
               for name, edits in (("ggml-rpc.cpp", rpc_patch.EDITS),
                                   ("transport.cpp", rpc_patch.TRANSPORT_EDITS))}
    output = OUTPUT_DIR / LIB_NAME
    stamp = OUTPUT_DIR / f"{LIB_NAME}.fingerprint"
    key = fingerprint(version, "".join(patched.values()), compiler)
    if not force and output.exists() and stamp.exists() and stamp.read_text() == key:
        say(f"{output.name} is up to date ({PACKAGE} {version})")
        return output
    sources = []
    for name, text in patched.items():
        sources.append(rpc_dir / f"meshllm-{name}")
        sources[-1].write_text(text)
    edits = len(rpc_patch.EDITS) + len(rpc_patch.TRANSPORT_EDITS)
    say(f"compiling {output.name} from {PACKAGE} {version}'s ggml-rpc with {edits} edits")
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    compile_library(root, sources, output, compiler)
    stamp.write_text(key)
    say(f"built {output} in {time.monotonic() - started:.1f} s")
    return output


def parse_args(argv: Sequence[str], env: Mapping[str, str]) -> argparse.Namespace:
    """The build's options from flags; the compiler defaults to $CXX as make's does."""
    parser = argparse.ArgumentParser(prog="python -m meshllm.native.build")
    parser.add_argument("--work-dir", default="build/native",
                        help="where the sdist is downloaded and unpacked")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("--cxx", default=env.get("CXX") or "g++",
                        help="C++ compiler (default: $CXX, else g++)")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv, process_env())
    try:
        build(Path(args.work_dir), args.force, args.cxx)
    except (BuildError, rpc_patch.PatchError, subprocess.CalledProcessError) as exc:
        print(f"[native] build failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
