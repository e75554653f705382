#!/usr/bin/env bash
# Builds every CPU image with podman from the real Dockerfiles and reports build time and
# size of each (the `make images` target).
#
#   bash scripts/containers/build_images.sh            # the pinned public bases (default)
#   MESHLLM_BASES=local bash scripts/containers/build_images.sh
#       # no registry: the stand-ins from scripts/containers/bases.sh, given as build args
#
# MESHLLM_VERSION (tag, 0.1.0), MESHLLM_IMAGES ("gateway planner blackboard worker-cpu"),
# MESHLLM_GGML_CPU_CMAKE_ARGS (empty: the Dockerfile's portable all-variants build; the
# container test passes "-DGGML_NATIVE=OFF" for one baseline backend, far quicker).
# MESHLLM_WORKER_WHEEL: "auto" (the default with local bases) hands the worker build the
# llama-cpp-python wheel `make install` built (scripts/containers/llama_wheel.py), so the
# image skips compiling llama.cpp, when the image's Python, libc and machine are this
# venv's; "none" (the default with public bases: portable images) always compiles.
# MESHLLM_VENV_PYTHON (.venv/bin/python): the venv whose wheel is reused.
# The model-fetch step runs the planner image, so it has no image of its own.
set -euo pipefail
cd "$(dirname "$0")/../.."

VERSION=${MESHLLM_VERSION:-0.1.0}
IMAGES=${MESHLLM_IMAGES:-gateway planner blackboard worker-cpu}
PYTHON_IMAGE=python:3.11.13-slim-bookworm
BASE_ARGS=()
WHEEL_MODE=${MESHLLM_WORKER_WHEEL:-none}
if [[ ${MESHLLM_BASES:-public} == local ]]; then
    bash scripts/containers/bases.sh
    PYTHON_IMAGE=localhost/meshllm-base/python:3.11-bookworm
    BASE_ARGS=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE")
    WHEEL_MODE=${MESHLLM_WORKER_WHEEL:-auto}
fi
VENV_PYTHON=${MESHLLM_VENV_PYTHON:-.venv/bin/python}
WHEELS=build/wheels
REPORT=${MESHLLM_IMAGE_REPORT:-build/images.tsv}
mkdir -p "$(dirname "$REPORT")"
: >"$REPORT"

build() {  # build NAME TAG DOCKERFILE [ARGS...]
    local name=$1 tag=$2 file=$3 start=$SECONDS
    shift 3
    echo "== $name: podman build $tag"
    # --format docker keeps HEALTHCHECK, which the OCI image format drops.
    podman build --format docker "${BASE_ARGS[@]}" --build-arg "VERSION=$VERSION" "$@" \
        -f "$file" -t "$tag" .
    local size
    size=$(podman image inspect --format '{{.Size}}' "$tag")
    printf '%s\t%s\t%d\t%d\n' "$name" "$tag" "$((SECONDS - start))" "$size" | tee -a "$REPORT"
}

# The wheel's file name under $WHEELS (the worker's LLAMA_CPP_WHEEL), or nothing: then the
# Dockerfile compiles llama.cpp. Says why whenever it falls back.
worker_wheel() {
    rm -rf "$WHEELS"
    [[ $WHEEL_MODE == auto ]] || return 0
    if [[ ! -x $VENV_PYTHON ]]; then
        echo "== worker-cpu: no $VENV_PYTHON, compiling llama.cpp in the image" >&2
        return 0
    fi
    local image_runtime
    image_runtime=$(podman run --rm -i "$PYTHON_IMAGE" python3 - --runtime \
        <scripts/containers/llama_wheel.py) || image_runtime=""
    "$VENV_PYTHON" scripts/containers/llama_wheel.py "$WHEELS" --image-runtime "$image_runtime" \
        || echo "== worker-cpu: compiling llama.cpp in the image instead" >&2
}

for image in $IMAGES; do
    case $image in
        gateway|planner|blackboard)
            build "$image" "mesh-llm/$image:$VERSION" "services/$image/Dockerfile" ;;
        worker-cpu)
            args=(--build-arg BACKEND=cpu)
            wheel=$(worker_wheel)
            if [[ -n $wheel ]]; then
                echo "== worker-cpu: reusing $wheel (same Python, libc, machine): no llama.cpp compile"
                args+=(--build-arg "LLAMA_CPP_WHEEL=$wheel")
            fi
            [[ -n ${MESHLLM_GGML_CPU_CMAKE_ARGS:-} ]] \
                && args+=(--build-arg "GGML_CPU_CMAKE_ARGS=$MESHLLM_GGML_CPU_CMAKE_ARGS")
            build "$image" "mesh-llm/shard-worker:$VERSION-cpu" services/shard-worker/Dockerfile \
                "${args[@]}" ;;
        *) echo "unknown image $image" >&2; exit 2 ;;
    esac
done
echo "== name, tag, build seconds, bytes (also in $REPORT)"
column -t "$REPORT"
