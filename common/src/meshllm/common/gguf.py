"""Reading the metadata header of a GGUF file without loading weights.

The planner sizes models from it and the worker picks a chat template from it; neither
needs llama.cpp for that.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from meshllm.common.errors import ModelSourceError

_SCALARS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",
                            6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
Scalar = int | float | bool | str


@dataclass(frozen=True)
class GgufHeader:
    version: int
    tensor_count: int
    metadata: dict[str, Scalar]       # scalar values only
    array_lengths: dict[str, int]     # arrays (vocabularies...) are skipped, only counted
    tensor_bytes: dict[str, int] = field(default_factory=dict)  # stored size of each tensor

    def get_int(self, key: str, default: int = 0) -> int:
        value = self.metadata.get(key, default)
        return int(value) if isinstance(value, int | float) else default

    def get_str(self, key: str, default: str = "") -> str:
        value = self.metadata.get(key, default)
        return value if isinstance(value, str) else default


def _read(f: BinaryIO, fmt: str) -> Scalar:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ModelSourceError("truncated GGUF header")
    value: Scalar = struct.unpack(fmt, data)[0]
    return value


def _read_string(f: BinaryIO) -> str:
    length = int(_read(f, "<Q"))
    return f.read(length).decode("utf-8", errors="replace")


def _skip_array(f: BinaryIO, elem_type: int, count: int) -> None:
    if elem_type == _STRING:
        for _ in range(count):
            f.seek(int(_read(f, "<Q")), 1)
    elif elem_type in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[elem_type]) * count, 1)
    else:
        raise ModelSourceError(f"unsupported GGUF array element type {elem_type}")


def _read_kv(f: BinaryIO, header: GgufHeader) -> None:
    key = _read_string(f)
    value_type = int(_read(f, "<I"))
    if value_type == _STRING:
        header.metadata[key] = _read_string(f)
    elif value_type == _ARRAY:
        elem_type, count = int(_read(f, "<I")), int(_read(f, "<Q"))
        header.array_lengths[key] = count
        _skip_array(f, elem_type, count)
    elif value_type in _SCALARS:
        header.metadata[key] = _read(f, _SCALARS[value_type])
    else:
        raise ModelSourceError(f"unsupported GGUF value type {value_type} for {key}")


def _read_tensor_sizes(f: BinaryIO, header: GgufHeader, file_size: int) -> None:
    """Sizes from the data offsets: each tensor runs to the next one (padding included)."""
    offsets = []
    for _ in range(header.tensor_count):
        name = _read_string(f)
        n_dims = int(_read(f, "<I"))
        f.seek(8 * n_dims + 4, 1)  # dimensions and type: the offsets already give sizes
        offsets.append((int(_read(f, "<Q")), name))
    alignment = header.get_int("general.alignment", 32)
    data_start = -(-f.tell() // alignment) * alignment
    offsets.sort()
    ends = [o for o, _ in offsets[1:]] + [file_size - data_start]
    for (offset, name), end in zip(offsets, ends, strict=True):
        header.tensor_bytes[name] = end - offset


def read_header(path: Path) -> GgufHeader:
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelSourceError(f"{path} is not a GGUF file (bad magic)")
            version = int(_read(f, "<I"))
            if version < 2:
                raise ModelSourceError(f"{path}: GGUF version {version} is too old")
            header = GgufHeader(version, int(_read(f, "<Q")), {}, {})
            for _ in range(int(_read(f, "<Q"))):
                _read_kv(f, header)
            _read_tensor_sizes(f, header, path.stat().st_size)
            return header
    except OSError as exc:
        raise ModelSourceError(f"cannot read {path}: {exc}") from exc
