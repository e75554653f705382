"""A model hosted on this worker, whole, as a split's head, or as a stage: starts what the
role needs and restarts it when it dies."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

from meshllm.common import models
from meshllm.common.errors import EngineUnavailable, MeshError, ModelSourceError
from meshllm.common.tls import PLAINTEXT, GrpcSecurity
from meshllm.common.types import LoadState, ModelState
from meshllm.worker import engine_wire as wire
from meshllm.worker.engine.batch.numerics import numerics_for
from meshllm.worker.engines import Engine, EngineSettings
from meshllm.worker.links import step_round_trip_s
from meshllm.worker.plans import HostPlan, Role
from meshllm.worker.shard_supply import Peers, ShardSupply, obtain_shard
from meshllm.worker.stage import (
    PrimeJob,
    PrimingFailed,
    StageServer,
    StageSettings,
    job_to_prime,
)
from meshllm.worker.stage_cache import Primed

log = logging.getLogger(__name__)

MAX_LOAD_ATTEMPTS = 3
PRIMING = "priming the stage's weight cache"
StagePrimer = Callable[[PrimeJob, Callable[[float], None]], Awaitable[Primed]]


class Runner(Protocol):
    async def wait_exited(self) -> int: ...
    async def stop(self) -> None: ...


@runtime_checkable
class LinkTuned(Protocol):
    """An engine that takes a split's round trip while it runs (ProcessEngine)."""

    def set_link_rtt(self, rtt_s: float) -> None: ...


class Tunnel(Protocol):
    async def start(self) -> str: ...
    async def close(self) -> None: ...


@dataclass(frozen=True)
class HostDeps:
    """How a host starts things; tests pass scripted ones."""

    engine_factory: Callable[[EngineSettings], Engine]
    tunnel_factory: Callable[[str, str], Tunnel]   # (stage gRPC address, model id)
    stage_factory: Callable[[StageSettings], StageServer]
    # Fills a stage's RPC cache from this worker's model file before it serves; None: off.
    stage_primer: StagePrimer | None = field(default=None, kw_only=True)
    threads: int
    stage_host: str          # where stage RPC servers listen: 127.0.0.1 unless direct
    stage_cache_dir: Path
    direct_rpc: bool         # heads dial stages' RPC servers directly when they allow it
    weight_repack: bool      # llama.cpp CPU weight repacking (see engine/batch/load_options)
    restart_backoff_s: float
    max_queue: int = wire.DEFAULT_MAX_QUEUE  # requests waiting for a slot before "busy"
    rpc_library: str = wire.DEFAULT_RPC_LIBRARY  # which ggml-rpc build heads and stages use
    log_level: str = wire.DEFAULT_LOG_LEVEL     # of the engine processes
    # The whole environment of engine and stage processes: nothing else is inherited.
    child_env: Mapping[str, str] = field(default_factory=dict)
    # Where expert shards are cut to and kept (under shards/).
    data_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "mesh-llm")
    security: GrpcSecurity = PLAINTEXT  # for channels to peers (receiving a shard)
    worker_id: str = ""                 # this worker, as peers sending it a shard log it


def compute_env(child_env: Mapping[str, str], deterministic: bool) -> dict[str, str]:
    """The environment of the processes computing a model (the engine, a stage): the
    kernel switches of its numerics, so that a stage computes as the head does."""
    return {**child_env, **numerics_for(deterministic).process_env()}


class ModelHost:
    def __init__(self, plan: HostPlan, deps: HostDeps,
                 on_change: Callable[[], Awaitable[None]],
                 links_ms: Callable[[], Mapping[str, float]] = dict,
                 shard_peers: Peers = lambda digest, name: []) -> None:
        self.plan = plan
        self.spec = plan.spec
        self.state = ModelState(plan.spec.model_id, LoadState.LOADING)
        self.engine: Engine | None = None
        self.stage: StageServer | None = None
        self.in_flight = 0
        self.draining = False  # retired: serves what it has, then the Worker stops it
        self._deps = deps
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self._tunnels: list[Tunnel] = []
        self._publishing: set[asyncio.Task[None]] = set()
        self._links_ms = links_ms  # this worker's measured round trips (LinkMonitor)
        self._link_rtt_s = 0.0  # what the engine was last given
        self._shard_peers = shard_peers  # who else holds a shard (or its model's file)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"host-{self.spec.model_id}")

    @property
    def started(self) -> bool:
        """False while it waits for memory: it holds none yet."""
        return self._task is not None

    def wait_for_memory(self, why: str) -> None:
        self.state = ModelState(self.spec.model_id, LoadState.LOADING, phase=why)

    def published_state(self) -> ModelState:
        """Its state as the worker record shows it: with drain and slot use, current."""
        slots = self.spec.slots
        return replace(self.state, draining=self.draining,
                       running=min(self.in_flight, slots),
                       queued=max(self.in_flight - slots, 0), slots=slots)

    async def _set(self, state: LoadState, error: str = "", restarted: bool = False,
                   phase: str = "", progress: float = 0.0) -> None:
        restarts = self.state.engine_restarts + (1 if restarted else 0)
        port = self.stage.port if self.stage is not None and self._deps.direct_rpc else 0
        self.state = ModelState(self.spec.model_id, state, error, restarts, port, phase,
                                progress)
        await self._on_change()

    def link_rtt_s(self) -> float:
        """What one step of this model waits on its links: 0 unless a split's head."""
        if self.plan.role is not Role.HEAD:
            return 0.0
        return step_round_trip_s(self._links_ms(), [p.worker_id for p in self.plan.peers])

    def follow_links(self) -> None:
        """The links were measured again: a running head's engine takes the new round trip
        at once (a control message on its pipe, no reload), for its draft tuner."""
        rtt_s = self.link_rtt_s()
        if rtt_s == self._link_rtt_s or not isinstance(self.engine, LinkTuned):
            return
        try:
            self.engine.set_link_rtt(rtt_s)
        except EngineUnavailable:  # the engine died: the next one loads with the new value
            return
        self._link_rtt_s = rtt_s
        log.info("%s: a step's round trip to its stages is now %.1f ms", self.spec.model_id,
                 rtt_s * 1000)

    async def _publish(self) -> None:
        await self._on_change()

    def _loading_progress(self, fraction: float, phase: str = "loading weights") -> None:
        """Called by the engine as weights load; published without blocking the load."""
        self.state = replace(self.state, phase=phase, progress=fraction)
        task = asyncio.get_running_loop().create_task(self._publish())
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _expert_shard(self) -> Path:
        """The shard this plan holds: cached, cut here, or received from a peer when this
        worker lacks the model file (progress published as it goes)."""
        loop = asyncio.get_running_loop()
        shown = [("", -1.0)]

        def progress(phase: str, fraction: float) -> None:  # in any thread
            last_phase, last = shown[0]
            if phase != last_phase or fraction - last >= 0.02 or fraction >= 1.0:
                shown[0] = (phase, fraction)
                loop.call_soon_threadsafe(self._loading_progress, fraction, phase)

        supply = ShardSupply(self._deps.data_dir, self._deps.worker_id, self._shard_peers,
                             self._deps.security)
        shard = await obtain_shard(self.spec, self.plan.experts, supply, progress)
        held = len(self.plan.experts[0])
        if shard.built and not shard.received:  # a received one: fetch_shard logged it
            log.info("expert shard of %s (%d experts per layer) cut in %.1fs: %s, %.1f MB, "
                     "%.1f MB/s", self.spec.model_id, held, shard.seconds, shard.path,
                     shard.file_bytes / 1e6, shard.file_bytes / 1e6 / max(shard.seconds, 1e-6))
        elif not shard.built:
            log.info("expert shard of %s (%d experts per layer) reused: %s",
                     self.spec.model_id, held, shard.path)
        return shard.path

    async def _speculative(self) -> str:
        """The model's speculative setting, with a draft model resolved to a local file."""
        mode, _, draft = self.spec.speculative.partition(":")
        if mode == "draft":
            return f"draft:{await asyncio.to_thread(models.materialize, draft)}"
        return mode or "none"

    async def _stage_endpoints(self) -> list[str]:
        endpoints = []
        for peer in self.plan.peers:
            if self._deps.direct_rpc and peer.rpc_endpoint:
                endpoints.append(peer.rpc_endpoint)
                continue
            tunnel = self._deps.tunnel_factory(peer.address, self.spec.model_id)
            self._tunnels.append(tunnel)
            endpoints.append(await tunnel.start())
        return endpoints

    async def _prime_stage_cache(self) -> None:
        """Writes this stage's weights into its server's cache from the local model file,
        so that the head offers their hashes and sends no bytes; without a local copy, or
        when it fails, the head sends them as it always could."""
        primer = self._deps.stage_primer
        if primer is None:
            return
        try:
            job = await job_to_prime(self.spec.source, self.plan.layer_start,
                                     self.plan.layer_end, self._deps.stage_cache_dir,
                                     self._compute_env())
        except ModelSourceError as exc:
            log.info("%s: no local model file to prime the stage's cache from (%s); the "
                     "head sends its weights", self.spec.model_id, exc)
            return
        if job is None:
            return  # a spare's priming (spare_cache) or an earlier stage got there first
        await self._set(LoadState.LOADING, self.state.error, phase=PRIMING)
        try:
            primed = await primer(job, lambda f: self._loading_progress(f, PRIMING))
        except PrimingFailed as exc:
            log.warning("%s: priming the stage's cache failed, the head sends its weights: "
                        "%s", self.spec.model_id, exc)
            return
        log.info("%s: stage cache primed for layers %d-%d from %s: %d tensors, %d written "
                 "(%.1f MB) in %.2fs", self.spec.model_id, job.layer_start, job.layer_end - 1,
                 job.model.name, primed.entries, primed.written, primed.bytes_written / 1e6,
                 primed.seconds)

    async def _start_stage(self) -> StageServer:
        await self._prime_stage_cache()
        stage = self._deps.stage_factory(StageSettings(
            self._deps.stage_host, self._deps.stage_cache_dir, self._deps.threads,
            self._deps.rpc_library, child_env=self._compute_env()))
        await stage.start()
        self.stage = stage
        return stage

    def _compute_env(self) -> dict[str, str]:
        return compute_env(self._deps.child_env, self.spec.deterministic)

    async def _engine_settings(self) -> EngineSettings:
        await self._set(LoadState.LOADING, self.state.error, phase="assembling model file")
        if self.plan.experts:  # a worker without the model file may receive its shard
            path = await self._expert_shard()
        else:
            path = await asyncio.to_thread(models.materialize, self.spec.source)
        phase = "connecting to stages" if self.plan.peers else "loading weights"
        self._link_rtt_s = self.link_rtt_s()
        await self._set(LoadState.LOADING, self.state.error, phase=phase)
        load = wire.Load(
            path, self.spec.context_length, self._deps.threads,
            rpc_endpoints=tuple(await self._stage_endpoints()),
            stage_layers=tuple(p.n_layers for p in self.plan.peers),
            weight_repack=self._deps.weight_repack, slots=self.spec.slots,
            max_queue=self._deps.max_queue, speculative=await self._speculative(),
            rpc_library=self._deps.rpc_library, chat_template=self.spec.chat_template,
            deterministic=self.spec.deterministic, link_rtt_s=self._link_rtt_s)
        return EngineSettings(load, self._compute_env(), on_progress=self._loading_progress,
                              log_level=self._deps.log_level)

    async def _load(self) -> Runner:
        started = asyncio.get_running_loop().time()
        if self.plan.role is Role.STAGE:
            return await self._start_stage()
        engine = self._deps.engine_factory(await self._engine_settings())
        await engine.start()
        self.engine = engine
        log.info("model %s loaded as %s (layers %d-%d) in %.1fs", self.spec.model_id,
                 self.plan.role.value, self.plan.layer_start, self.plan.layer_end - 1,
                 asyncio.get_running_loop().time() - started)
        return engine

    async def _run(self) -> None:
        if not self.plan.ready_to_load:
            waiting = ", ".join(self.plan.waiting_for)
            await self._set(LoadState.LOADING, phase=f"waiting for stages on {waiting}")
            return  # the plan changes (and a new host starts) once they serve
        failures = 0
        while failures < MAX_LOAD_ATTEMPTS:
            try:
                runner = await self._load()
            except MeshError as exc:
                failures += 1
                log.error("loading %s failed (%d/%d): %s", self.spec.model_id, failures,
                          MAX_LOAD_ATTEMPTS, exc)
                await self._close_tunnels()
                await self._set(LoadState.FAILED, str(exc))
                await asyncio.sleep(self._deps.restart_backoff_s * failures)
                continue
            failures = 0
            await self._set(LoadState.READY)
            code = await runner.wait_exited()
            self.engine, self.stage = None, None
            await self._close_tunnels()
            log.error("%s of %s died (exit code %d); restarting", self.plan.role.value,
                      self.spec.model_id, code)
            await self._set(LoadState.LOADING, f"engine died (exit code {code})", restarted=True)
            await asyncio.sleep(self._deps.restart_backoff_s)

    async def _close_tunnels(self) -> None:
        for tunnel in self._tunnels:
            await tunnel.close()
        self._tunnels.clear()

    def ready_engine(self) -> Engine:
        if self.engine is None or self.state.state is not LoadState.READY:
            what = "a pipeline stage" if self.plan.role is Role.STAGE else self.state.state.value
            raise EngineUnavailable(f"model {self.spec.model_id} is {what} on this worker")
        return self.engine

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for runner in (self.engine, self.stage):
            if runner is not None:
                await runner.stop()
        await self._close_tunnels()

