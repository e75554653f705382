#!/usr/bin/env bash
# Builds llama.cpp's C++ `llama-server` from the SAME llama.cpp source that llama-cpp-python
# vendors, so that bench/batching.py compares engines on identical kernels.
# Output: build/llama-server/bin/llama-server (build/ is git-ignored).
# Runs at the lowest priority with one job by default: the machine is shared.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-1}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$ROOT/build/llama-server"
PY="${PYTHON:-$ROOT/.venv/bin/python}"

mkdir -p "$WORK/src"
if [ ! -d "$WORK/src/llama_cpp_python-$VERSION" ]; then
  # The sdist is the only place the exact vendored llama.cpp revision is published.
  "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK/src"
  tar -xzf "$WORK/src/llama_cpp_python-$VERSION.tar.gz" -C "$WORK/src"
fi
SRC="$WORK/src/llama_cpp_python-$VERSION/vendor/llama.cpp"

# Same CPU options as the Python build (native CPU kernels, no GPU, RPC on), static libs so
# the binary runs without the Python package's shared objects on the library path.
GENERATOR=()
if command -v ninja >/dev/null; then GENERATOR=(-G Ninja); fi
nice -n 19 cmake -S "$SRC" -B "$WORK/cmake" "${GENERATOR[@]}" \
  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_RPC=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
nice -n 19 cmake --build "$WORK/cmake" --target llama-server -j "$JOBS"
# llama.cpp's CMakeLists fixes the output folder to <build>/bin; publish it where the bench looks.
mkdir -p "$WORK/bin"
cp "$WORK/cmake/bin/llama-server" "$WORK/bin/llama-server"
echo "built: $WORK/bin/llama-server"
