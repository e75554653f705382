"""Synthetic llama-architecture GGUF files (random F16 weights, a real tokenizer) for
benchmarks that need larger tensors than gemma3-270m has. No hub is reachable here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SDIST = ROOT / "build" / "llama-server" / "src" / "llama_cpp_python-0.3.36"
VOCAB = SDIST / "vendor" / "llama.cpp" / "models" / "ggml-vocab-llama-spm.gguf"


def vocab_file() -> Path:
    """llama.cpp's vocab-only test file, from the llama-cpp-python sdist (fetched once)."""
    if not VOCAB.exists():
        download = SDIST.parent
        download.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", "llama-cpp-python==0.3.36", "-d", str(download)], check=True)
        subprocess.run(["tar", "-xzf", str(download / f"{SDIST.name}.tar.gz"), "-C",
                        str(download)], check=True)
    return VOCAB


def _copy_tokenizer(writer: Any, vocab: Path) -> int:
    import gguf

    reader = gguf.GGUFReader(str(vocab))
    n_vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if key == "tokenizer.ggml.tokens":
            n_vocab = len(value)
        writer.add_key_value(key, value, field.types[0],
                             field.types[1] if len(field.types) > 1 else None)
    return n_vocab


def make_llama(path: Path, n_layer: int, n_embd: int, n_ff: int, n_head: int = 16) -> Path:
    """Writes (once) a model whose attention and FFN matrices are F16, n_embd x n_embd and
    n_embd x n_ff: large enough for ggml's RPC tensor cache, which hashes tensors > 10 MB."""
    import gguf

    if path.exists():
        return path
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(n_layer)
    writer.add_context_length(2048)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    n_vocab = _copy_tokenizer(writer, vocab_file())

    def weight(rows: int, cols: int) -> Any:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    ones = np.ones(n_embd, dtype=np.float32)
    writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", weight(n_vocab, n_embd))
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", weight(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(n_embd, n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
