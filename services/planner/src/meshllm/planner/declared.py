"""The declared models: those given at start, described from their GGUF files (once each,
off the event loop), and the records a planning round reads."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from meshllm.common import convert, demand, models, store
from meshllm.common.demand import ModelDemand
from meshllm.common.errors import InvalidRecord, MeshError
from meshllm.common.moe import ExpertRanking
from meshllm.common.suspects import SuspectReport, parse_suspect
from meshllm.common.types import ModelDeclaration, ModelId, ModelSpec, WorkerId, WorkerInfo
from meshllm.planner.config import PlannerConfig

log = logging.getLogger(__name__)

Describe = Callable[[ModelDeclaration], ModelSpec]  # raises MeshError when it cannot


def start_declarations(config: PlannerConfig) -> list[ModelDeclaration]:
    """The --models as declarations: as many replicas as fit, priority 0."""
    return [ModelDeclaration(models.model_id_for(source), source, at_start=True)
            for source in config.models]


def describer(config: PlannerConfig) -> Describe:
    """A declaration's ModelSpec from its GGUF header, with the engine settings the
    planner's flags give its source (or every model)."""
    def describe(declaration: ModelDeclaration) -> ModelSpec:
        source = declaration.source
        spec = models.describe(source, config.context_length_tokens, source in config.split)
        mode = config.speculative.get(source, config.speculative.get("*", "auto"))
        template = config.chat_templates.get(source, config.chat_templates.get("*", ""))
        exact = config.deterministic.get(source, config.deterministic.get("*", True))
        return dataclasses.replace(spec, model_id=declaration.model_id, slots=config.slots,
                                   speculative=mode, chat_template=template,
                                   deterministic=exact)
    return describe


@dataclass(frozen=True)
class PlanInputs:
    workers: tuple[WorkerInfo, ...]
    declarations: tuple[ModelDeclaration, ...]  # by model id
    demand: Mapping[ModelId, ModelDemand] = field(default_factory=dict)  # over the gateways
    rankings: Mapping[str, ExpertRanking] = field(default_factory=dict)  # by model digest
    suspects: Mapping[WorkerId, SuspectReport] = field(default_factory=dict)  # by worker id


def parse_inputs(raw: Mapping[str, bytes]) -> PlanInputs:
    """Valid worker, declaration and demand records under the mesh's prefix; an invalid
    one is logged and left out, never trusted."""
    workers, declarations, gateways, rankings, suspects = [], [], [], [], []
    for key, value in raw.items():
        try:
            if key.startswith(store.SUSPECTS):
                suspects.append(parse_suspect(value))
            elif key.startswith(store.MOE_RANKINGS):
                rankings.append(convert.parse_ranking(value))
            elif key.startswith(store.WORKERS):
                workers.append(convert.parse_worker(value))
            elif key.startswith(store.DECLARATIONS):
                declarations.append(convert.parse_declaration(value))
            elif key.startswith(store.DEMAND):
                gateways.append(demand.parse_demand(value))
        except InvalidRecord as exc:
            log.warning("ignoring invalid record %s: %s", key, exc)
    return PlanInputs(tuple(workers), tuple(sorted(declarations, key=lambda d: d.model_id)),
                      demand.merged(gateways, [d.model_id for d in declarations]),
                      {r.model_digest: r for r in rankings},
                      {r.worker_id: r for r in suspects})


Described = ModelSpec | str  # the spec, or why the model could not be read


class ModelCatalog:
    """Specs of the declared models, each described once while it stays declared (by id
    and source: the rest of a declaration does not change what the file holds)."""

    def __init__(self, describe: Describe) -> None:
        self._describe = describe
        self._known: dict[tuple[ModelId, str], Described] = {}

    async def describe(self, declarations: Sequence[ModelDeclaration]
                       ) -> dict[ModelId, Described]:
        wanted = {(d.model_id, d.source): d for d in declarations}
        self._known = {k: v for k, v in self._known.items() if k in wanted}
        for key, declaration in wanted.items():
            if key not in self._known:
                self._known[key] = await self._read(declaration)
        return {model_id: self._known[model_id, source] for model_id, source in wanted}

    async def _read(self, declaration: ModelDeclaration) -> Described:
        log.info("reading model %s", declaration.source)
        try:
            spec = await asyncio.to_thread(self._describe, declaration)
        except MeshError as exc:
            log.warning("cannot serve model %s: %s", declaration.source, exc)
            return f"cannot read model {declaration.source}: {exc}"
        log.info("model %s: %d layers, %d MB weights, context %d", spec.model_id,
                 spec.n_layers, spec.weights_bytes // 10**6, spec.context_length)
        if spec.moe is not None:
            log.info("model %s: a mixture of %d experts (%d used per token) in %d layers; %s",
                     spec.model_id, spec.moe.expert_count, spec.moe.expert_used_count,
                     spec.moe.moe_layers, "split by layers, as --split asks" if
                     spec.force_split else "served whole where one worker holds it, else "
                     "by expert shards (--split for a layer split)")
        return spec


def specs_of(described: Mapping[ModelId, Described]) -> list[ModelSpec]:
    return [d for d in described.values() if isinstance(d, ModelSpec)]

