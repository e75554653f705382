"""Reading the metadata header of a GGUF file without loading weights.

The planner sizes models from it and the worker picks a chat template from it; neither
needs llama.cpp for that.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from meshllm.common.errors import ModelSourceError

_SCALARS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",
                            6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
Scalar = int | float | bool | str

# ggml type id -> (elements per block, bytes per block), from ggml.h / gguf's GGML_QUANT_SIZES
# (a unit test keeps the two in step). Types missing here still read; only their exact
# unpadded size is unknown.
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 40), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176),
    14: (256, 210), 15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98),
    19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82), 23: (256, 136), 24: (1, 1),
    25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the contiguous axis, dims[-1] the outermost
    ggml_type: int
    offset: int            # from the start of the data section

    @property
    def nbytes(self) -> int | None:
        """Unpadded size, or None for a ggml type this module does not know."""
        block = GGML_BLOCKS.get(self.ggml_type)
        if block is None or not self.dims or self.dims[0] % block[0]:
            return None
        elements = 1
        for d in self.dims:
            elements *= d
        return elements // block[0] * block[1]


@dataclass(frozen=True)
class GgufHeader:
    version: int
    tensor_count: int
    metadata: dict[str, Scalar]       # scalar values only
    array_lengths: dict[str, int]     # arrays (vocabularies...) are skipped, only counted
    tensor_bytes: dict[str, int] = field(default_factory=dict)  # stored size of each tensor
    # Where things lie in the file, for tools that rewrite it (expert surgery):
    tensors: dict[str, TensorInfo] = field(default_factory=dict)  # in tensor-info order
    kv_spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # [start, end) per key
    value_types: dict[str, int] = field(default_factory=dict)  # GGUF value type per key
    kv_end: int = 0       # file offset where the tensor infos begin
    data_start: int = 0   # file offset of the (aligned) data section

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
        # Inlined: this loop is most of the read time of a 262k-token vocabulary.
        for _ in range(count):
            length = f.read(8)
            if len(length) != 8:
                raise ModelSourceError("truncated GGUF header")
            f.seek(int.from_bytes(length, "little"), 1)
    elif elem_type in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[elem_type]) * count, 1)
    else:
        raise ModelSourceError(f"unsupported GGUF array element type {elem_type}")


def _read_kv(f: BinaryIO, header: GgufHeader) -> None:
    start = f.tell()
    key = _read_string(f)
    value_type = int(_read(f, "<I"))
    header.value_types[key] = value_type
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
    header.kv_spans[key] = (start, f.tell())


def _read_tensor_sizes(f: BinaryIO, header: GgufHeader, file_size: int) -> int:
    """Sizes from the data offsets: each tensor runs to the next one (padding included).
    Returns the file offset of the data section."""
    offsets = []
    for _ in range(header.tensor_count):
        name = _read_string(f)
        n_dims = int(_read(f, "<I"))
        dims = tuple(int(_read(f, "<Q")) for _ in range(n_dims))
        ggml_type, offset = int(_read(f, "<I")), int(_read(f, "<Q"))
        header.tensors[name] = TensorInfo(name, dims, ggml_type, offset)
        offsets.append((offset, name))
    alignment = header.get_int("general.alignment", 32)
    data_start = -(-f.tell() // alignment) * alignment
    offsets.sort()
    ends = [o for o, _ in offsets[1:]] + [file_size - data_start]
    for (offset, name), end in zip(offsets, ends, strict=True):
        header.tensor_bytes[name] = end - offset
    return data_start


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
            kv_end = f.tell()
            data_start = _read_tensor_sizes(f, header, path.stat().st_size)
            return dataclasses.replace(header, kv_end=kv_end, data_start=data_start)
    except OSError as exc:
        raise ModelSourceError(f"cannot read {path}: {exc}") from exc
