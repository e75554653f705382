"""The one place where domain types meet protobuf messages.

Parsing validates: records from etcd or a peer are untrusted until they pass here.
"""

from __future__ import annotations

import re

from meshllm.common import convert_moe
from meshllm.common.convert_placement import placement_from_pb as placement_from_pb
from meshllm.common.convert_placement import placement_to_pb as placement_to_pb
from meshllm.common.errors import InvalidRecord
from meshllm.common.moe import ExpertRanking
from meshllm.common.records import decode_record
from meshllm.common.types import (
    ChatMessage,
    Embeddings,
    EmbedInput,
    EmbedRequest,
    Finished,
    GenerateEvent,
    GenerateRequest,
    Grammar,
    GrammarKind,
    LoadState,
    ModelDeclaration,
    ModelId,
    ModelSpec,
    ModelState,
    Placement,
    RequestId,
    Resume,
    SamplingParams,
    TokenDelta,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
    WorkerId,
    WorkerInfo,
    WorkerStats,
)
from meshllm.v1 import mesh_pb2, worker_pb2

MODEL_ID = re.compile(r"[a-z0-9._-]{1,128}")  # what models.model_id_for makes
_STATE_TO_PB = {
    LoadState.LOADING: mesh_pb2.MODEL_LOAD_STATE_LOADING,
    LoadState.READY: mesh_pb2.MODEL_LOAD_STATE_READY,
    LoadState.FAILED: mesh_pb2.MODEL_LOAD_STATE_FAILED,
}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise InvalidRecord(what)


def model_state_to_pb(s: ModelState) -> mesh_pb2.ModelState:
    return mesh_pb2.ModelState(
        model_id=s.model_id, state=_STATE_TO_PB[s.state], error=s.error,
        engine_restarts=s.engine_restarts, rpc_port=s.rpc_port, phase=s.phase,
        progress=s.progress, draining=s.draining, running=s.running, queued=s.queued,
        slots=s.slots,
    )


def model_state_from_pb(m: mesh_pb2.ModelState) -> ModelState:
    _require(bool(m.model_id), "model state without model_id")
    _require(m.state in _STATE_FROM_PB, f"model state {m.model_id}: unknown state {m.state}")
    return ModelState(ModelId(m.model_id), _STATE_FROM_PB[m.state], m.error, m.engine_restarts,
                      m.rpc_port, m.phase, min(1.0, max(0.0, m.progress)), m.draining,
                      m.running, m.queued, m.slots)


def worker_to_pb(w: WorkerInfo) -> mesh_pb2.WorkerRecord:
    return mesh_pb2.WorkerRecord(
        worker_id=w.worker_id, address=w.address, backend=w.backend,
        memory_budget_bytes=w.memory_budget_bytes, threads=w.threads,
        started_at_unix_s=w.started_at_unix_s,
        models=[model_state_to_pb(m) for m in w.models], rtt_ms=dict(w.rtt_ms),
        rpc_host=w.rpc_host, model_files=w.model_files, expert_shards=w.expert_shards,
    )


def worker_from_pb(m: mesh_pb2.WorkerRecord) -> WorkerInfo:
    _require(bool(m.worker_id), "worker record without worker_id")
    host, _, port = m.address.rpartition(":")
    _require(bool(host) and port.isdigit(), f"worker {m.worker_id}: bad address {m.address!r}")
    _require(m.memory_budget_bytes > 0, f"worker {m.worker_id}: memory budget must be > 0")
    _require(m.threads > 0, f"worker {m.worker_id}: threads must be > 0")
    return WorkerInfo(
        worker_id=WorkerId(m.worker_id), address=m.address, backend=m.backend or "cpu",
        memory_budget_bytes=m.memory_budget_bytes, threads=m.threads,
        started_at_unix_s=m.started_at_unix_s,
        models=tuple(model_state_from_pb(s) for s in m.models),
        rtt_ms={k: v for k, v in m.rtt_ms.items() if v >= 0}, rpc_host=m.rpc_host,
        model_files=tuple(m.model_files), expert_shards=tuple(m.expert_shards),
    )


def model_spec_to_pb(s: ModelSpec) -> mesh_pb2.ModelSpec:
    return mesh_pb2.ModelSpec(
        model_id=s.model_id, source=s.source, weights_bytes=s.weights_bytes,
        n_layers=s.n_layers, context_length=s.context_length,
        kv_bytes_per_token=s.kv_bytes_per_token, architecture=s.architecture,
        train_context_length=s.train_context_length, shared_bytes=s.shared_bytes,
        layer_bytes=list(s.layer_bytes), force_split=s.force_split, slots=s.slots,
        speculative=s.speculative, chat_template=s.chat_template,
        fast_kernels=not s.deterministic, model_digest=s.model_digest,
        moe=convert_moe.moe_to_pb(s.moe) if s.moe else None,
    )


def model_spec_from_pb(m: mesh_pb2.ModelSpec) -> ModelSpec:
    _require(bool(m.model_id), "model spec without model_id")
    _require(bool(m.source), f"model {m.model_id}: no source")
    _require(m.weights_bytes > 0, f"model {m.model_id}: weights size must be > 0")
    _require(m.n_layers > 0, f"model {m.model_id}: n_layers must be > 0")
    _require(m.context_length > 0, f"model {m.model_id}: context_length must be > 0")
    _require(len(m.layer_bytes) in (0, m.n_layers),
             f"model {m.model_id}: {len(m.layer_bytes)} layer sizes for {m.n_layers} layers")
    return ModelSpec(
        model_id=ModelId(m.model_id), source=m.source, weights_bytes=m.weights_bytes,
        n_layers=m.n_layers, context_length=m.context_length,
        kv_bytes_per_token=m.kv_bytes_per_token, architecture=m.architecture,
        train_context_length=m.train_context_length, shared_bytes=m.shared_bytes,
        layer_bytes=tuple(m.layer_bytes), force_split=m.force_split, slots=max(1, m.slots),
        speculative=m.speculative or "none", chat_template=m.chat_template,
        deterministic=not m.fast_kernels, model_digest=m.model_digest,
        moe=convert_moe.moe_from_pb(m.model_id, m.architecture, m.moe)
        if m.HasField("moe") else None,
    )


def declaration_to_pb(d: ModelDeclaration) -> mesh_pb2.ModelDeclaration:
    return mesh_pb2.ModelDeclaration(model_id=d.model_id, source=d.source,
                                     min_replicas=d.min_replicas, max_replicas=d.max_replicas,
                                     priority=d.priority, at_start=d.at_start)


def declaration_from_pb(m: mesh_pb2.ModelDeclaration) -> ModelDeclaration:
    _require(bool(MODEL_ID.fullmatch(m.model_id)),
             f"model declaration: bad model_id {m.model_id[:80]!r}")
    _require(bool(m.source), f"model declaration {m.model_id}: no source")
    _require(m.max_replicas == 0 or m.min_replicas <= m.max_replicas,
             f"model declaration {m.model_id}: min_replicas {m.min_replicas} > "
             f"max_replicas {m.max_replicas}")
    return ModelDeclaration(ModelId(m.model_id), m.source, m.min_replicas, m.max_replicas,
                            m.priority, m.at_start)


def parse_worker(raw: bytes) -> WorkerInfo:
    return worker_from_pb(decode_record(mesh_pb2.WorkerRecord(), raw))


def parse_model_spec(raw: bytes) -> ModelSpec:
    return model_spec_from_pb(decode_record(mesh_pb2.ModelSpec(), raw))


def parse_declaration(raw: bytes) -> ModelDeclaration:
    return declaration_from_pb(decode_record(mesh_pb2.ModelDeclaration(), raw))


def parse_placement(raw: bytes) -> Placement:
    return placement_from_pb(decode_record(mesh_pb2.Placement(), raw))


ranking_to_pb, ranking_from_pb = convert_moe.ranking_to_pb, convert_moe.ranking_from_pb


def parse_ranking(raw: bytes) -> ExpertRanking:
    return ranking_from_pb(decode_record(mesh_pb2.ExpertRanking(), raw))



def sampling_to_pb(s: SamplingParams) -> worker_pb2.SamplingParams:
    pb = worker_pb2.SamplingParams(
        max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, stop=list(s.stop),
        top_k=s.top_k, presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty, repeat_penalty=s.repeat_penalty,
        min_p=s.min_p,
        logit_bias=[worker_pb2.LogitBias(token=t, bias=b) for t, b in s.logit_bias],
    )
    if s.seed is not None:
        pb.seed = s.seed
    return pb


def sampling_from_pb(m: worker_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=m.max_tokens, temperature=m.temperature, top_p=m.top_p,
        seed=m.seed if m.HasField("seed") else None, stop=tuple(m.stop), top_k=m.top_k,
        presence_penalty=m.presence_penalty, frequency_penalty=m.frequency_penalty,
        repeat_penalty=m.repeat_penalty, min_p=m.min_p,
        logit_bias=tuple(sorted((b.token, b.bias) for b in m.logit_bias)),
    )


_GRAMMAR_KINDS = {GrammarKind.JSON_SCHEMA: worker_pb2.Grammar.JSON_SCHEMA,
                  GrammarKind.LARK: worker_pb2.Grammar.LARK}


def grammar_to_pb(g: Grammar) -> worker_pb2.Grammar:
    return worker_pb2.Grammar(kind=_GRAMMAR_KINDS[g.kind], source=g.source)


def grammar_from_pb(m: worker_pb2.Grammar) -> Grammar:
    kinds = {v: k for k, v in _GRAMMAR_KINDS.items()}
    _require(m.kind in kinds, f"grammar of unknown kind {m.kind}")
    return Grammar(kinds[m.kind], m.source)


def chat_message_to_pb(c: ChatMessage) -> worker_pb2.ChatMessage:
    return worker_pb2.ChatMessage(
        role=c.role, content=c.content, tool_call_id=c.tool_call_id, name=c.name,
        tool_calls=[worker_pb2.ToolCall(call_id=t.call_id, name=t.name, arguments=t.arguments)
                    for t in c.tool_calls])


def chat_message_from_pb(m: worker_pb2.ChatMessage) -> ChatMessage:
    calls = tuple(ToolCall(t.call_id, t.name, t.arguments) for t in m.tool_calls)
    return ChatMessage(m.role, m.content, calls, m.tool_call_id, m.name)


def generate_request_to_pb(r: GenerateRequest) -> worker_pb2.GenerateRequest:
    pb = worker_pb2.GenerateRequest(
        request_id=r.request_id, model_id=r.model_id, sampling=sampling_to_pb(r.sampling),
        tools_json=r.tools_json,
    )
    if r.chat is not None:
        pb.chat.messages.extend(chat_message_to_pb(m) for m in r.chat)
    else:
        pb.text = r.text or ""
    if r.grammar is not None:
        pb.grammar.CopyFrom(grammar_to_pb(r.grammar))
    if r.logprobs is not None:
        pb.logprobs = r.logprobs
    if r.resume is not None:
        pb.resume.CopyFrom(worker_pb2.Resume(token_ids=r.resume.token_ids,
                                             draws=r.resume.draws,
                                             migrations=r.resume.migrations))
    return pb


def _resume_from_pb(m: worker_pb2.GenerateRequest) -> Resume | None:
    if not m.HasField("resume"):
        return None
    _require(m.resume.migrations > 0, "a resumed generation that has not moved")
    return Resume(tuple(m.resume.token_ids), m.resume.draws, m.resume.migrations)


def generate_request_from_pb(m: worker_pb2.GenerateRequest) -> GenerateRequest:
    _require(bool(m.model_id), "generate request without model_id")
    kind = m.WhichOneof("prompt")
    _require(kind is not None, "generate request without a prompt")
    chat = None
    if kind == "chat":
        chat = tuple(chat_message_from_pb(x) for x in m.chat.messages)
    return GenerateRequest(
        request_id=RequestId(m.request_id), model_id=ModelId(m.model_id),
        text=m.text if kind == "text" else None, chat=chat,
        sampling=sampling_from_pb(m.sampling),
        grammar=grammar_from_pb(m.grammar) if m.HasField("grammar") else None,
        logprobs=m.logprobs if m.HasField("logprobs") else None,
        tools_json=m.tools_json, resume=_resume_from_pb(m),
    )


def _logprob_to_pb(t: TokenLogprob) -> worker_pb2.TokenLogprob:
    return worker_pb2.TokenLogprob(
        token=t.token, token_bytes=t.token_bytes, logprob=t.logprob,
        top=[worker_pb2.TopLogprob(token=x.token, token_bytes=x.token_bytes, logprob=x.logprob)
             for x in t.top])


def _logprob_from_pb(m: worker_pb2.TokenLogprob) -> TokenLogprob:
    top = tuple(TopLogprob(x.token, x.token_bytes, x.logprob) for x in m.top)
    return TokenLogprob(m.token, m.token_bytes, m.logprob, top)


def event_to_pb(e: GenerateEvent) -> worker_pb2.GenerateResponse:
    if isinstance(e, TokenDelta):
        delta = worker_pb2.TokenDelta(text=e.text, tokens=e.tokens,
                                      logprobs=[_logprob_to_pb(t) for t in e.logprobs],
                                      sent_ids=e.sent_ids, draws=e.draws)
        return worker_pb2.GenerateResponse(delta=delta)
    usage = worker_pb2.Usage(
        prompt_tokens=e.usage.prompt_tokens, completion_tokens=e.usage.completion_tokens,
        cached_tokens=e.usage.cached_tokens,
    )
    return worker_pb2.GenerateResponse(
        finished=worker_pb2.Finished(finish_reason=e.finish_reason, usage=usage,
                                     queued_s=e.queued_s, service_s=e.service_s)
    )


def event_from_pb(m: worker_pb2.GenerateResponse) -> GenerateEvent:
    kind = m.WhichOneof("event")
    if kind == "delta":
        logprobs = tuple(_logprob_from_pb(t) for t in m.delta.logprobs)
        return TokenDelta(m.delta.text, m.delta.tokens, logprobs, tuple(m.delta.sent_ids),
                          m.delta.draws)
    _require(kind == "finished", "generate response without an event")
    u = m.finished.usage
    return Finished(m.finished.finish_reason,
                    Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens),
                    max(0.0, m.finished.queued_s), max(0.0, m.finished.service_s))


def stats_to_pb(s: WorkerStats) -> worker_pb2.WorkerStats:
    return worker_pb2.WorkerStats(
        worker_id=s.worker_id, running_requests=s.running_requests,
        queued_requests=s.queued_requests, generated_tokens_total=s.generated_tokens_total,
        prompt_tokens_total=s.prompt_tokens_total,
        models=[model_state_to_pb(m) for m in s.models],
    )


def stats_from_pb(m: worker_pb2.WorkerStats) -> WorkerStats:
    return WorkerStats(
        worker_id=WorkerId(m.worker_id), running_requests=m.running_requests,
        queued_requests=m.queued_requests, generated_tokens_total=m.generated_tokens_total,
        prompt_tokens_total=m.prompt_tokens_total,
        models=tuple(model_state_from_pb(x) for x in m.models),
    )


def _embed_input_to_pb(i: EmbedInput) -> worker_pb2.EmbedInput:
    if isinstance(i, str):
        return worker_pb2.EmbedInput(text=i)
    return worker_pb2.EmbedInput(tokens=worker_pb2.TokenIds(ids=i))


def _embed_input_from_pb(m: worker_pb2.EmbedInput) -> EmbedInput:
    kind = m.WhichOneof("input")
    _require(kind is not None, "embed input without text or tokens")
    return m.text if kind == "text" else tuple(m.tokens.ids)


def embed_request_to_pb(r: EmbedRequest) -> worker_pb2.EmbedRequest:
    return worker_pb2.EmbedRequest(request_id=r.request_id, model_id=r.model_id,
                                   inputs=[_embed_input_to_pb(i) for i in r.inputs])


def embed_request_from_pb(m: worker_pb2.EmbedRequest) -> EmbedRequest:
    _require(bool(m.model_id), "embed request without model_id")
    _require(len(m.inputs) > 0, "embed request without inputs")
    return EmbedRequest(RequestId(m.request_id), ModelId(m.model_id),
                        tuple(_embed_input_from_pb(i) for i in m.inputs))


def embeddings_to_pb(e: Embeddings) -> worker_pb2.EmbedResponse:
    return worker_pb2.EmbedResponse(
        embeddings=[worker_pb2.Embedding(values=v) for v in e.vectors],
        prompt_tokens=e.prompt_tokens)


def embeddings_from_pb(m: worker_pb2.EmbedResponse) -> Embeddings:
    return Embeddings(tuple(tuple(x.values) for x in m.embeddings), m.prompt_tokens)
