"""What a worker can send a peer that lacks a mixture-of-experts model's file: the MoE
model files it can read (by sha256) and the expert shards in its cache. Published in its
record (WorkerInfo.model_files, .expert_shards), read by peers choosing whom to ask
(shard_source).

Checked in a thread, again every few seconds and at once when the mesh's MoE models
change: a file may appear, a shard is cut or received. A file's sha256 is computed once
per (path, size, mtime) here, besides the sidecar `moe.model_digest` keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from meshllm.common import models
from meshllm.common.errors import ModelSourceError
from meshllm.common.moe import model_digest
from meshllm.common.types import ModelSpec
from meshllm.worker.shards import cached_shards

log = logging.getLogger(__name__)

RESCAN_S = 5.0
MAX_ADVERTISED_SHARDS = 64  # a record stays small; the shards of current models come first


class Inventory:
    def __init__(self, data_dir: Path, rescan_s: float = RESCAN_S) -> None:
        self.model_files: tuple[str, ...] = ()
        self.expert_shards: tuple[str, ...] = ()
        self._data_dir = data_dir
        self._rescan_s = rescan_s
        self._digests: dict[tuple[str, int, int], str] = {}
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Check again now (the models changed, a shard was written)."""
        self._wake.set()

    def _digest(self, spec: ModelSpec) -> str:
        """The sha256 of this worker's copy of the model's file; "" when it has none."""
        try:
            path = models.materialize(spec.source)
            stat = path.stat()
            key = (str(path), stat.st_size, stat.st_mtime_ns)
            if key not in self._digests:
                self._digests[key] = model_digest(path)
            return self._digests[key]
        except (ModelSourceError, OSError):
            return ""

    def _scan(self, specs: Iterable[ModelSpec]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        moe = [s for s in specs if s.moe is not None and s.model_digest]
        files = sorted({s.model_digest for s in moe if self._digest(s) == s.model_digest})
        prefixes = tuple(s.model_digest[:16] for s in moe)
        shards = cached_shards(self._data_dir)
        current = [name for name in shards if name.startswith(prefixes)]
        others = [name for name in shards if not name.startswith(prefixes)]
        return tuple(files), tuple((current + others)[:MAX_ADVERTISED_SHARDS])

    async def refresh(self, specs: Iterable[ModelSpec]) -> bool:
        """Checks what this worker holds now; whether that changed."""
        files, shards = await asyncio.to_thread(self._scan, list(specs))
        changed = (files, shards) != (self.model_files, self.expert_shards)
        if files != self.model_files:
            log.info("model files this worker can send shards of: %s",
                     ", ".join(f[:12] for f in files) or "none")
        self.model_files, self.expert_shards = files, shards
        return changed

    async def run(self, specs: Callable[[], Iterable[ModelSpec]],
                  on_change: Callable[[], Awaitable[None]]) -> None:
        """Keeps the inventory current, calling `on_change` when it changed."""
        while True:
            self._wake.clear()
            if await self.refresh(specs()):
                await on_change()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._rescan_s)
