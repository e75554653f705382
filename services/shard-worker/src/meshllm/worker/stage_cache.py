"""A stage's weight cache, filled from this worker's own copy of the model file.

A split's head uploads each weight of a stage's layers to the stage's ggml RPC server. It
first offers the tensor's hash (our client does from 64 KiB up); a server that finds a file
named by that hash in its cache directory loads the bytes from disk and the head sends
nothing more. So a stage worker that can read the model file writes those files itself
before its server starts, and the weights never cross the link: a stage re-planned onto a
spare after a failure, or a first load over a slow network, then costs the head one round
trip per tensor instead of the stage's bytes.

Entries are content-addressed (the hash of the bytes), so priming from a file that differs
from the head's is harmless: the head never asks for those hashes. An index per model file
(keyed by its path, size and mtime) remembers the hashes, so a second priming costs a stat
per tensor, not a pass over the bytes.

`python -m meshllm.worker.stage_cache` does the work in a child process (it loads our
native library for the hash) and reports progress as JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from meshllm.common.gguf import GgufHeader, read_header

# The smallest tensor our client offers by hash (rpc_patch.HASH_THRESHOLD); stock clients
# offer from 10 MiB, so entries between the two are written but not asked for.
MIN_ENTRY_BYTES = 64 * 1024
_LAYER = re.compile(r"blk\.(\d+)\.")

# (address, size) -> the stage server's cache key for those bytes
Hasher = Callable[[int, int], int]


@dataclass(frozen=True)
class CacheEntry:
    name: str     # the tensor
    offset: int   # of its bytes in the model file
    nbytes: int   # as llama.cpp uploads it (unpadded)


@dataclass(frozen=True)
class Primed:
    entries: int          # tensors of the layers that the cache now holds
    written: int          # of which written now (the others were there)
    bytes_written: int
    seconds: float


def layer_entries(header: GgufHeader, layer_start: int, layer_end: int,
                  min_bytes: int = MIN_ENTRY_BYTES) -> tuple[CacheEntry, ...]:
    """The cache entries a head asks a stage of layers [layer_start, layer_end) for: the
    layers' tensors of at least `min_bytes` (of a known ggml type: the size must be exact)."""
    entries = []
    for info in header.tensors.values():
        match = _LAYER.match(info.name)
        if match is None or not layer_start <= int(match.group(1)) < layer_end:
            continue
        if info.nbytes is not None and info.nbytes >= min_bytes:
            entries.append(CacheEntry(info.name, header.data_start + info.offset, info.nbytes))
    return tuple(entries)


def entry_file(cache_dir: Path, key: int) -> Path:
    return cache_dir / f"{key:016x}"  # ggml-rpc's name for a cache entry


def index_path(cache_dir: Path, model: Path) -> Path:
    """Where the hashes of `model`'s tensors are remembered: one file per file version."""
    stat = model.stat()
    identity = f"{model.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return cache_dir / f"index-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"


def _load_index(path: Path) -> dict[str, int]:
    try:
        raw = json.loads(path.read_text())
        return {str(k): int(v, 16) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}  # absent or damaged: hash again


def _write_atomically(path: Path, data: memoryview | bytes) -> None:
    temporary = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with temporary.open("wb") as f:
            f.write(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


class _Primer:
    """One pass over a model file's entries; a file at an entry's name is always whole."""

    def __init__(self, model: Path, cache_dir: Path, hasher: Hasher) -> None:
        self.cache_dir = cache_dir
        self.index_file = index_path(cache_dir, model)
        self.index = _load_index(self.index_file)
        self._hasher = hasher
        self.written = self.bytes_written = 0

    def ensure(self, view: memoryview, address: int, entry: CacheEntry) -> None:
        key = self.index.get(entry.name)
        if key is not None:
            existing = entry_file(self.cache_dir, key)
            if existing.is_file() and existing.stat().st_size == entry.nbytes:
                return
        key = self._hasher(address + entry.offset, entry.nbytes)
        self.index[entry.name] = key
        target = entry_file(self.cache_dir, key)
        if target.is_file() and target.stat().st_size == entry.nbytes:
            return
        _write_atomically(target, view[entry.offset:entry.offset + entry.nbytes])
        self.written += 1
        self.bytes_written += entry.nbytes

    def save_index(self) -> None:
        text = json.dumps({k: f"{v:016x}" for k, v in sorted(self.index.items())})
        _write_atomically(self.index_file, text.encode())


def covered(model: Path, cache_dir: Path, layer_start: int, layer_end: int) -> bool:
    """Whether the cache holds every entry of the layers already, by the index: a stat per
    tensor, no hashing (and no native library), so a primed stage starts at once."""
    index = _load_index(index_path(cache_dir, model)) if cache_dir.is_dir() else {}
    for entry in layer_entries(read_header(model), layer_start, layer_end):
        key = index.get(entry.name)
        if key is None:
            return False
        file = entry_file(cache_dir, key)
        if not file.is_file() or file.stat().st_size != entry.nbytes:
            return False
    return True


def prime(model: Path, cache_dir: Path, entries: Sequence[CacheEntry], hasher: Hasher,
          progress: Callable[[int, int], None] | None = None) -> Primed:
    """Writes the cache files of `entries` that `cache_dir` lacks; `progress(done, total)`
    in bytes as it goes. Raises OSError when the file or the directory fails."""
    import numpy as np  # the address of mapped bytes without copying them

    started = time.monotonic()
    cache_dir.mkdir(parents=True, exist_ok=True)
    primer = _Primer(model, cache_dir, hasher)
    total, done = sum(e.nbytes for e in entries), 0
    with model.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        array = np.frombuffer(mm, dtype=np.uint8)
        try:
            address = int(array.ctypes.data)
            with memoryview(mm) as view:
                for entry in entries:
                    primer.ensure(view, address, entry)
                    done += entry.nbytes
                    if progress is not None:
                        progress(done, total)
        finally:
            del array  # the mapping closes only once nothing exports it
    primer.save_index()
    return Primed(len(entries), primer.written, primer.bytes_written,
                  time.monotonic() - started)


def _layers(text: str) -> tuple[int, int]:
    start, _, end = text.partition(":")
    try:
        first, last = int(start), int(end)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers wants START:END, got {text!r}") from None
    if not 0 <= first < last:
        raise argparse.ArgumentTypeError(f"--layers {text!r}: START must be below END")
    return first, last


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshllm.worker.stage_cache")
    parser.add_argument("--model", type=Path, required=True, help="the GGUF file to read")
    parser.add_argument("--cache-dir", type=Path, required=True, help="the stage's cache")
    parser.add_argument("--layers", type=_layers, required=True, help="START:END, END excluded")
    args = parser.parse_args(argv)
    from meshllm.native.rpc import cache_hash

    def report(done: int, total: int) -> None:
        print(json.dumps({"done": done, "total": total}), flush=True)

    entries = layer_entries(read_header(args.model), *args.layers)
    primed = prime(args.model, args.cache_dir, entries, cache_hash, report)
    print(json.dumps({"primed": asdict(primed)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
