"""A tiny Llama GGUF file written by the tests with gguf's own writer and quantizer: float32 embeddings and norms,
the decoder projections in one block type (Q4_0, Q4_1, Q8_0, ...), the output projection in float32 or a block
type of its own."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS, VOCAB = 64, 128, 4, 2, 2, 320
_PROJECTIONS = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (HIDDEN // HEADS * KV_HEADS, HIDDEN),
                "attn_v": (HIDDEN // HEADS * KV_HEADS, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
                "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}


def write_tiny_gguf(path: Path, linear_type: GGMLQuantizationType, seed: int = 0,
                    head_type: GGMLQuantizationType = GGMLQuantizationType.F32) -> Path:
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    normal = lambda *shape, mean=0.0: rng.normal(mean, 0.15, size=shape).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", normal(VOCAB, HIDDEN))
    w.add_tensor("output_norm.weight", normal(HIDDEN, mean=1.0))
    head = normal(VOCAB, HIDDEN)
    if head_type == GGMLQuantizationType.F32:
        w.add_tensor("output.weight", head)
    else:
        w.add_tensor("output.weight", quantize(head, head_type), raw_dtype=head_type)
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", normal(HIDDEN, mean=1.0))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", normal(HIDDEN, mean=1.0))
        for name, (rows, cols) in _PROJECTIONS.items():
            # rows of different magnitudes within a row's blocks, so Q8_0 blocks of one row differ in scale
            weight = normal(rows, cols) * rng.uniform(0.5, 2.0, size=(1, cols)).astype(np.float32)
            w.add_tensor(f"blk.{i}.{name}.weight", quantize(weight, linear_type), raw_dtype=linear_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
