"""A stage of a split model on this worker: a ggml RPC server in a child process."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from meshllm.common import models
from meshllm.common.errors import EngineUnavailable, MeshError
from meshllm.common.ports import PortPicker
from meshllm.worker.child import ChildProcess
from meshllm.worker.engine_wire import DEFAULT_RPC_LIBRARY
from meshllm.worker.stage_cache import Primed, covered

START_TIMEOUT_S = 30.0
START_ATTEMPTS = 3  # a port checked free can still be bound by another server first


@dataclass(frozen=True)
class StageSettings:
    host: str            # 127.0.0.1 behind the tunnel; the advertised host in direct mode
    cache_dir: Path
    threads: int
    library: str = DEFAULT_RPC_LIBRARY  # meshllm | stock ggml-rpc build
    child_env: Mapping[str, str] = field(kw_only=True)  # the server process's environment


class StageServer:
    """Starts the RPC server and reports when it accepts connections."""

    def __init__(self, settings: StageSettings) -> None:
        self._settings = settings
        self._proc: ChildProcess | None = None
        self._ports = PortPicker(settings.host)
        self.port = 0

    async def start(self) -> None:
        """Start the server; one that exits at once (its port taken after all) is tried
        again on the next port, one that never listens is not."""
        s = self._settings
        for _ in range(START_ATTEMPTS):
            self.port = self._ports.pick()
            self._proc = await ChildProcess.start(
                [sys.executable, "-m", "meshllm.worker.rpc_server",
                 "--endpoint", f"{s.host}:{self.port}", "--cache-dir", str(s.cache_dir),
                 "--threads", str(s.threads), "--library", s.library],
                s.child_env, pipes=False)
            if await self._listening():
                return
            if self._proc.returncode is None:
                break
        await self.stop()
        raise EngineUnavailable(f"the RPC stage server did not start on {s.host}:{self.port}")

    async def _listening(self) -> bool:
        """True once the server accepts connections; False if it exits or times out."""
        assert self._proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while loop.time() < deadline and self._proc.returncode is None:
            try:
                _, writer = await asyncio.open_connection(self._settings.host, self.port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.close()
            return True
        return False

    async def wait_exited(self) -> int:
        assert self._proc is not None
        return await self._proc.wait()

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()  # it holds no state worth a graceful exit
            await self._proc.wait()


class PrimingFailed(MeshError):
    """The stage's cache could not be filled from the local file: the head sends the bytes."""


@dataclass(frozen=True)
class PrimeJob:
    model: Path                 # this worker's copy of the model file
    layer_start: int
    layer_end: int              # excluded
    cache_dir: Path             # the stage server's
    child_env: Mapping[str, str] = field(kw_only=True)


async def job_to_prime(source: str, layer_start: int, layer_end: int, cache_dir: Path,
                       child_env: Mapping[str, str]) -> PrimeJob | None:
    """The priming a stage of these layers needs from this worker's copy of the model
    file; None when the cache holds them already. Raises ModelSourceError when this worker
    has no copy."""
    path = await asyncio.to_thread(models.materialize, source)
    if await asyncio.to_thread(covered, path, cache_dir, layer_start, layer_end):
        return None
    return PrimeJob(path, layer_start, layer_end, cache_dir, child_env=child_env)


async def prime_stage_cache(job: PrimeJob, progress: Callable[[float], None]) -> Primed:
    """Runs `meshllm.worker.stage_cache` for the job's layers; `progress` gets 0..1."""
    child = await ChildProcess.start(
        [sys.executable, "-m", "meshllm.worker.stage_cache", "--model", str(job.model),
         "--cache-dir", str(job.cache_dir), "--layers", f"{job.layer_start}:{job.layer_end}"],
        job.child_env, pipes=True)
    primed: Primed | None = None
    try:
        while line := await child.read_line():
            message = json.loads(line)
            if "primed" in message:
                primed = Primed(**message["primed"])
            else:
                progress(message["done"] / max(message["total"], 1))
    except (ValueError, TypeError, KeyError) as exc:
        child.kill()
        raise PrimingFailed(f"the priming process wrote {line[:200]!r}: {exc}") from exc
    finally:
        code = await child.wait()
    if primed is None or code != 0:
        raise PrimingFailed(f"the priming process exited with code {code} (its log is above)")
    return primed
