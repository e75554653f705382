"""Generate the Python gRPC code from protos/ into the shared package.

The generated modules are build output (git-ignored): edit the .proto files and run
this again, never the generated files.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "common" / "src"


def main() -> int:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        *protos,
    ]
    code = int(protoc.main(args))
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
        return code
    for package_dir in {(OUT / p).parent for p in protos}:
        (package_dir / "__init__.py").touch()
    print(f"generated {len(protos)} proto files into {OUT / 'meshllm'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
