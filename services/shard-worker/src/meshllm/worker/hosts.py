"""A model hosted on this worker: loads its engine, restarts it when it dies."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from meshllm.common import models
from meshllm.common.errors import EngineUnavailable, MeshError
from meshllm.common.types import LoadState, ModelSpec, ModelState
from meshllm.worker.engine import Engine, EngineSettings

log = logging.getLogger(__name__)

EngineFactory = Callable[[EngineSettings], Engine]
MAX_LOAD_ATTEMPTS = 3


class ModelHost:
    def __init__(self, spec: ModelSpec, threads: int, factory: EngineFactory,
                 on_change: Callable[[], Awaitable[None]], restart_backoff_s: float) -> None:
        self.spec = spec
        self.state = ModelState(spec.model_id, LoadState.LOADING)
        self.engine: Engine | None = None
        self.in_flight = 0
        self._threads = threads
        self._factory = factory
        self._on_change = on_change
        self._backoff_s = restart_backoff_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"host-{self.spec.model_id}")

    async def _set(self, state: LoadState, error: str = "", restarted: bool = False) -> None:
        restarts = self.state.engine_restarts + (1 if restarted else 0)
        self.state = ModelState(self.spec.model_id, state, error, restarts)
        await self._on_change()

    async def _load(self) -> Engine:
        path: Path = await asyncio.to_thread(models.materialize, self.spec.source)
        engine = self._factory(EngineSettings(path, self.spec.context_length, self._threads))
        started = asyncio.get_running_loop().time()
        await engine.start()
        log.info("model %s loaded in %.1fs", self.spec.model_id,
                 asyncio.get_running_loop().time() - started)
        return engine

    async def _run(self) -> None:
        failures = 0
        while failures < MAX_LOAD_ATTEMPTS:
            try:
                self.engine = await self._load()
            except MeshError as exc:
                failures += 1
                log.error("loading %s failed (%d/%d): %s", self.spec.model_id, failures,
                          MAX_LOAD_ATTEMPTS, exc)
                await self._set(LoadState.FAILED, str(exc))
                await asyncio.sleep(self._backoff_s * failures)
                continue
            failures = 0
            await self._set(LoadState.READY)
            code = await self.engine.wait_exited()
            self.engine = None
            log.error("engine for %s died (exit code %d); restarting", self.spec.model_id, code)
            await self._set(LoadState.LOADING, f"engine died (exit code {code})", restarted=True)
            await asyncio.sleep(self._backoff_s)

    def ready_engine(self) -> Engine:
        if self.engine is None or self.state.state is not LoadState.READY:
            raise EngineUnavailable(
                f"model {self.spec.model_id} is {self.state.state.value} on this worker"
            )
        return self.engine

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.engine is not None:
            await self.engine.stop()
