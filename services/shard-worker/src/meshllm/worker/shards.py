"""A worker's expert shards: cut from the model file it can read (or received from a peer
when it has none: shard_supply), kept under its data directory by (model hash, expert
selection) and reused while they are there.

A shard is written under a name of its own first and renamed into place, so a file at the
shard's path is always whole: a worker that dies mid-build leaves only a temporary file,
and two workers sharing the directory may build the same shard at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from meshllm.common.errors import ModelSourceError
from meshllm.common.moe import ExpertSelection, model_digest
from meshllm.worker.moe_shard import write_shard

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"


@dataclass(frozen=True)
class ShardFile:
    path: Path
    built: bool          # False: found in the cache
    seconds: float       # spent building it (0 when cached)
    file_bytes: int
    received: bool = False  # built by a peer and sent here (this worker lacks the file)


def selection_key(selection: ExpertSelection) -> str:
    """16 hex digits that name an expert selection (the layers' lists in order)."""
    text = json.dumps([list(layer) for layer in selection], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shard_name(digest: str, selection: ExpertSelection) -> str:
    """What names a shard in the cache and in a worker's record (WorkerInfo.expert_shards)."""
    return f"{digest[:16]}-{selection_key(selection)}"


def shard_path(data_dir: Path, digest: str, selection: ExpertSelection) -> Path:
    return data_dir / SHARDS_DIR / f"{shard_name(digest, selection)}.gguf"


def temporary_for(path: Path) -> Path:
    """A name of this writer's own beside `path`: two workers sharing the directory may
    write the same shard at once, and only whole files are renamed to `path`."""
    return path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def cached_shards(data_dir: Path) -> tuple[str, ...]:
    """The names of the shards in the cache (whole files only: temporaries end .tmp)."""
    try:
        return tuple(sorted(p.stem for p in (data_dir / SHARDS_DIR).glob("*.gguf")))
    except OSError:
        return ()


def ensure_shard(source: Path, data_dir: Path, selection: ExpertSelection,
                 expected_digest: str = "",
                 progress: Callable[[float], None] | None = None) -> ShardFile:
    """The shard of `source` holding `selection`: from the cache, or cut now (blocking:
    run it in a thread). `progress` gets the fraction written as it goes."""
    digest = model_digest(source)
    if expected_digest and digest != expected_digest:
        log.warning("%s differs from the file the planner read (sha256 %s, not %s): cutting "
                    "the shard from this worker's copy", source, digest[:12],
                    expected_digest[:12])
    path = shard_path(data_dir, digest, selection)
    if path.is_file():
        return ShardFile(path, False, 0.0, path.stat().st_size)
    started = time.monotonic()
    temporary = temporary_for(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_shard(source, temporary, selection,
                    None if progress is None else lambda done, total: progress(
                        done / total if total else 1.0))
        os.replace(temporary, path)
    except OSError as exc:
        raise ModelSourceError(f"cannot write the expert shard {path}: {exc}") from exc
    finally:
        temporary.unlink(missing_ok=True)
    return ShardFile(path, True, time.monotonic() - started, path.stat().st_size)
