"""Expert surgery: a standalone GGUF holding the whole trunk of a mixture-of-experts model
and a subset of its routed experts.

Every `*_exps` tensor has the expert axis outermost, so each expert is one contiguous byte
range whatever the quantization: the shard is cut as raw bytes, never dequantized. The
router (`ffn_gate_inp`, `exp_probs_b`) keeps the rows of the kept experts in the order
given, so a permutation of all experts computes the same model. Each MoE layer may keep its
own experts (an ExpertSelection: calibration ranks experts per layer), as long as every
layer keeps as many, since the file has one expert_count. The source is read through
a memory map one range at a time and the pages read are dropped again, so memory stays
near one chunk whatever the model's size. The header is copied byte for byte except the two
expert counts and the tensor table (the gguf package's reader would parse a 262k-token
vocabulary into ~0.7 GB of objects first).
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from meshllm.common.errors import ModelSourceError
from meshllm.common.gguf import GgufHeader, TensorInfo, read_header
from meshllm.common.moe import (
    ExpertSelection,
    MoeLayout,
    TensorRole,
    UnsupportedMoeLayout,
    as_selection,
    expert_blocks,
    moe_layout,
    shard_metadata,
    tensor_role,
)

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)
Experts = Sequence[int] | Sequence[Sequence[int]]  # one list for every layer, or one per layer

_CHUNK = 1 << 20  # bytes copied (and then dropped from memory) at a time
_DROP_ALIGN = 1 << 20  # dropped spans are widened to this (a multiple of the fault-around)
_INT_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}


@dataclass(frozen=True)
class Piece:
    """One tensor of the shard: its new table entry and the source bytes it is made of."""

    info: TensorInfo
    ranges: tuple[tuple[int, int], ...]  # (file offset in the source, length)

    @property
    def nbytes(self) -> int:
        return sum(length for _, length in self.ranges)


@dataclass(frozen=True)
class ShardWritten:
    path: Path
    experts: ExpertSelection  # per MoE layer, in the order written
    expert_count: int
    expert_used_count: int
    tensor_bytes: int   # data bytes without alignment padding
    file_bytes: int


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _stored_bytes(header: GgufHeader, info: TensorInfo) -> int:
    return info.nbytes if info.nbytes is not None else header.tensor_bytes[info.name]


def _layer_of(name: str, moe_index: dict[int, int]) -> int:
    """The MoE layer (index into a selection) that the expert or router tensor `name` is in."""
    block = int(name.split(".")[1])
    if block not in moe_index:
        raise UnsupportedMoeLayout(
            f"tensor {name} is a router in block {block}, which holds no routed experts")
    return moe_index[block]


def plan_shard(header: GgufHeader, layout: MoeLayout, experts: Experts) -> list[Piece]:
    """The shard's tensors in the source's order, with offsets in the shard's data section."""
    selection = as_selection(layout, experts)
    moe_index = {block: i for i, block in enumerate(expert_blocks(header))}
    alignment = header.get_int("general.alignment", 32)
    pieces, offset = [], 0
    for info in header.tensors.values():
        start = header.data_start + info.offset
        dims = info.dims
        if tensor_role(info.name) in (TensorRole.EXPERT, TensorRole.ROUTER):
            kept = selection[_layer_of(info.name, moe_index)]
            stride = _stored_bytes(header, info) // layout.expert_count
            ranges = tuple((start + e * stride, stride) for e in kept)
            dims = (*info.dims[:-1], len(kept))
        else:
            ranges = ((start, _stored_bytes(header, info)),)
        piece = Piece(TensorInfo(info.name, dims, info.ggml_type, offset), ranges)
        pieces.append(piece)
        offset += _pad(piece.nbytes, alignment)
    return pieces


def _metadata_patches(header: GgufHeader, values: dict[str, int]) -> list[tuple[int, bytes]]:
    """(file offset, new bytes) for each integer in `values`, in file order."""
    patches = []
    for key, value in values.items():
        fmt = _INT_FORMATS.get(header.value_types.get(key, -1))
        if fmt is None:
            raise UnsupportedMoeLayout(f"metadata {key} is not an integer in this file")
        encoded = struct.pack(fmt, value)
        patches.append((header.kv_spans[key][1] - len(encoded), encoded))
    return sorted(patches)


def _tensor_table(pieces: Sequence[Piece]) -> bytes:
    table = bytearray()
    for piece in pieces:
        info = piece.info
        name = info.name.encode()
        table += struct.pack("<Q", len(name)) + name + struct.pack("<I", len(info.dims))
        table += struct.pack(f"<{len(info.dims)}Q", *info.dims)
        table += struct.pack("<IQ", info.ggml_type, info.offset)
    return bytes(table)


class _Copier:
    """Copies source byte ranges through the memory map, a chunk at a time, dropping the
    pages read from this process (the page cache keeps them) so that its memory stays near
    one chunk."""

    def __init__(self, view: memoryview, mm: mmap.mmap, out: BinaryIO,
                 tick: Callable[[int], None]) -> None:
        self.view, self.mm, self.out, self.tick = view, mm, out, tick

    def copy(self, start: int, length: int, counted: bool = True) -> None:
        position, end = start, start + length
        while position < end:
            stop = min(position + _CHUNK, end)
            self.out.write(self.view[position:stop])
            # Wider than the range read: the kernel's fault-around maps the neighbours of
            # each page touched (pages already dropped, or experts skipped) too.
            low = position // _DROP_ALIGN * _DROP_ALIGN
            high = min(len(self.mm), _pad(stop, _DROP_ALIGN))
            self.mm.madvise(mmap.MADV_DONTNEED, low, high - low)
            if counted:
                self.tick(stop - position)
            position = stop

    def pad(self, alignment: int) -> None:
        at = self.out.tell()
        self.out.write(bytes(_pad(at, alignment) - at))


def _write_header(copier: _Copier, header: GgufHeader, pieces: Sequence[Piece],
                  values: dict[str, int]) -> None:
    """The source's header byte for byte, but for the expert counts and the tensor table."""
    position = 0
    for offset, encoded in _metadata_patches(header, values):
        copier.copy(position, offset - position, counted=False)
        copier.out.write(encoded)
        position = offset + len(encoded)
    copier.copy(position, header.kv_end - position, counted=False)
    copier.out.write(_tensor_table(pieces))
    copier.pad(header.get_int("general.alignment", 32))


def _write_file(source: BinaryIO, out: BinaryIO, header: GgufHeader, pieces: Sequence[Piece],
                values: dict[str, int], progress: Progress | None) -> None:
    total, done = sum(piece.nbytes for piece in pieces), 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    with mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        mm.madvise(mmap.MADV_SEQUENTIAL)
        with memoryview(mm) as view:
            copier = _Copier(view, mm, out, tick)
            _write_header(copier, header, pieces, values)
            for piece in pieces:
                for start, length in piece.ranges:
                    copier.copy(start, length)
                copier.pad(header.get_int("general.alignment", 32))


def _source_layout(src: Path) -> tuple[GgufHeader, MoeLayout]:
    header = read_header(src)
    layout = moe_layout(header)
    if layout is None:
        arch = header.get_str("general.architecture")
        raise UnsupportedMoeLayout(
            f"{src} is a dense model ({arch} without {arch}.expert_count): it has no experts "
            "to shard; split it by layers instead")
    return header, layout


def write_shard(src: Path, dst: Path, experts: Experts,
                progress: Progress | None = None) -> ShardWritten:
    """Writes the shard of `src` holding `experts` (in that order; one list for every MoE
    layer, or one per layer) to `dst`, atomically."""
    header, layout = _source_layout(src)
    pieces = plan_shard(header, layout, experts)
    values = dict(shard_metadata(layout, experts))
    if dst.resolve() == src.resolve():
        raise ModelSourceError(f"the shard would overwrite its source {src}")
    partial = dst.with_name(dst.name + ".partial")
    try:
        with src.open("rb") as source, partial.open("wb") as out:
            _write_file(source, out, header, pieces, values, progress)
        os.replace(partial, dst)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ModelSourceError(f"cannot write the shard {dst}: {exc}") from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    kept = as_selection(layout, experts)
    return ShardWritten(dst, kept, len(kept[0]), values[f"{layout.arch}.expert_used_count"],
                        sum(p.nbytes for p in pieces), dst.stat().st_size)
