"""ggml's RPC backend through ctypes: serve this machine's CPU to a remote llama.cpp, or
register remote RPC servers as devices before a model is loaded.

llama-cpp-python ships `libggml.so` and `libggml.so.0` as separate copies of one library.
`libllama.so` links the `.so.0` names; loading `libggml.so` would map a second ggml with
its own backend registry, and devices registered there would be invisible to llama.cpp.
So everything here loads the `.so.0` files.
"""

from __future__ import annotations

import ctypes
import enum
import functools
from collections.abc import Callable
from pathlib import Path
from typing import cast

from meshllm.common.errors import MeshError


class NativeError(MeshError):
    pass


def lib_dir() -> Path:
    import llama_cpp  # only processes that run llama.cpp import this module

    return Path(llama_cpp.__file__).resolve().parent / "lib"


class RpcLibrary(enum.Enum):
    """Which ggml-rpc implementation serves and drives split models."""

    MESHLLM = "meshllm"  # ours, built by `python -m meshllm.native.build`; see rpc_patch.py
    STOCK = "stock"  # the libggml-rpc.so.0 shipped in llama-cpp-python


MESHLLM_LIBRARY = Path(__file__).resolve().parent / "lib" / "libmeshllm-ggml-rpc.so"


@functools.cache
def _ggml() -> ctypes.CDLL:
    """libggml by its .so.0 name, with ggml-base, globally visible."""
    import llama_cpp  # noqa: F401  loads libllama and with it the .so.0 ggml libraries

    base = lib_dir()
    mode = ctypes.RTLD_GLOBAL
    ctypes.CDLL(str(base / "libggml-base.so.0"), mode=mode)
    ggml = ctypes.CDLL(str(base / "libggml.so.0"), mode=mode)
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_name.restype = ctypes.c_char_p
    ggml.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_load_all_from_path.restype = None
    ggml.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
    ggml.ggml_backend_cpu_buffer_type.argtypes = []
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_register.restype = None
    return ggml


def library_path(library: RpcLibrary) -> Path:
    if library is RpcLibrary.STOCK:
        return lib_dir() / "libggml-rpc.so.0"
    if not MESHLLM_LIBRARY.exists():
        raise NativeError(f"{MESHLLM_LIBRARY.name} is not built: run `python -m "
                          "meshllm.native.build` (make install does), or use the stock library")
    return MESHLLM_LIBRARY


@functools.cache
def _rpc(library: RpcLibrary) -> ctypes.CDLL:
    """A ggml-rpc library. Ours is loaded privately (its symbols are hidden and bound to
    itself), so it coexists with the stock one that libggml may also have loaded."""
    _ggml()
    mode = ctypes.RTLD_GLOBAL if library is RpcLibrary.STOCK else ctypes.RTLD_LOCAL
    rpc = ctypes.CDLL(str(library_path(library)), mode=mode)
    rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    rpc.ggml_backend_rpc_start_server.restype = None
    rpc.ggml_backend_rpc_start_server.argtypes = [
        ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_void_p),
    ]
    return rpc


@functools.cache
def _cache_hasher() -> Callable[[int, int], int]:
    rpc = _rpc(RpcLibrary.MESHLLM)
    rpc.ggml_backend_rpc_meshllm_cache_hash.restype = ctypes.c_uint64
    rpc.ggml_backend_rpc_meshllm_cache_hash.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return cast(Callable[[int, int], int], rpc.ggml_backend_rpc_meshllm_cache_hash)


def cache_hash(address: int, size: int) -> int:
    """The key under which a stage server caches a tensor of `size` bytes at `address` (the
    FNV-1a hash ggml-rpc computes), from our library: a stock build exports no hasher."""
    return _cache_hasher()(address, size)


GGML_BACKEND_DEVICE_TYPE_CPU = 0


class TensorBuftOverride(ctypes.Structure):
    """llama.cpp's llama_model_tensor_buft_override: tensors whose name matches `pattern`
    (a regular expression) are stored in buffer type `buft`."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def cpu_overrides(pattern: str) -> ctypes.Array[TensorBuftOverride]:
    """A NULL-terminated override list keeping tensors that match `pattern` on the CPU.

    The caller must keep the returned array alive until the model is loaded.
    """
    ggml = _ggml()
    entries = (TensorBuftOverride * 2)()
    entries[0].pattern = pattern.encode()
    entries[0].buft = ggml.ggml_backend_cpu_buffer_type()
    return entries


def ensure_backends() -> None:
    """Load llama.cpp's backends when they are built as loadable modules.

    Portable images build with GGML_BACKEND_DL (one CPU backend per instruction set,
    chosen at run time); llama-cpp-python never loads them, so there would be no device at
    all. A build with the backends linked in already has its devices and is left alone.
    """
    ggml = _ggml()
    if ggml.ggml_backend_dev_count() == 0:
        ggml.ggml_backend_load_all_from_path(str(lib_dir()).encode())
    if ggml.ggml_backend_dev_count() == 0:
        raise NativeError(f"no llama.cpp backend could be loaded from {lib_dir()}")


def device_names() -> list[str]:
    ggml = _ggml()
    names = []
    for i in range(ggml.ggml_backend_dev_count()):
        name = ggml.ggml_backend_dev_name(ggml.ggml_backend_dev_get(i))
        names.append(name.decode() if name else "?")
    return names


def add_rpc_servers(endpoints: list[str],
                    library: RpcLibrary = RpcLibrary.MESHLLM) -> list[str]:
    """Register remote RPC servers (host:port) as devices; call before loading a model.

    Returns the device names llama.cpp will list for them, in registration order.
    """
    ggml, rpc = _ggml(), _rpc(library)
    before = set(device_names())
    for endpoint in endpoints:
        reg = rpc.ggml_backend_rpc_add_server(endpoint.encode())
        if not reg:
            raise NativeError(f"cannot add RPC server {endpoint}")
        ggml.ggml_backend_register(reg)
    return [n for n in device_names() if n not in before]


def set_pipelined(endpoints: list[str]) -> None:
    """Opts the connections to `endpoints` in to our client's pipelining (rpc_patch.py):
    a request that waits for its reply no longer holds the socket, so several contexts
    (the engine's groups) have requests in flight on one connection at once. Applies to
    connections opened after the call: call it after add_rpc_servers, before the load.
    Our library only (the stock one lacks the symbol)."""
    rpc = _rpc(RpcLibrary.MESHLLM)
    opt_in = rpc.ggml_backend_rpc_meshllm_set_pipelined
    opt_in.restype = None
    opt_in.argtypes = [ctypes.c_char_p, ctypes.c_int]
    for endpoint in endpoints:
        opt_in(endpoint.encode(), 1)


def serve_cpu(endpoint: str, cache_dir: Path | None, threads: int,
              library: RpcLibrary = RpcLibrary.MESHLLM) -> None:
    """Serve this process's CPU device over ggml RPC at `endpoint`. Blocks forever.

    With a cache directory, a client re-sending tensors the server has seen sends only
    their hashes, so reloading a split model moves almost no weight bytes.
    """
    ensure_backends()
    ggml, rpc = _ggml(), _rpc(library)
    cpu = ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    if not cpu:
        raise NativeError("no CPU backend device found")
    devices = (ctypes.c_void_p * 1)(cpu)
    cache = str(cache_dir).encode() if cache_dir else None
    if cache_dir:
        cache_dir.mkdir(parents=True, exist_ok=True)
    rpc.ggml_backend_rpc_start_server(endpoint.encode(), cache, threads, 1, devices)
