"""Weights and hyper-parameters from a GGUF file (read with the `gguf` package), dequantized to float32 and then
copied into the model's dtype.

llama.cpp's converter permutes the rows of attn_q/attn_k for its interleaved rotary layout; we undo that, so
the weights match HF's half-rotation layout and the same model code serves both formats.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType, ReaderTensor
from gguf.quants import dequantize

from engine_svc.loader.hf_loader import _Sized
from engine_svc.model_config import ModelConfig
from engine_svc.model_name import gguf_served_name

_GGUF_TO_HF = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_ARCHITECTURES = {"llama": "LlamaForCausalLM"}


@functools.lru_cache(maxsize=2)
def open_gguf(path: Path) -> GGUFReader:
    """Parsing a GGUF's metadata takes seconds (its tokenizer arrays hold ~100k strings): parse once per file."""
    return GGUFReader(path)


def gguf_field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    if field.types[0] == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    value = field.parts[field.data[0]]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(value).decode("utf-8")
    return value.tolist()[0]


def gguf_model_config(path: Path) -> ModelConfig:
    reader = open_gguf(path)
    arch = gguf_field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {sorted(_ARCHITECTURES)}")
    a = lambda key, default=None: gguf_field(reader, f"{arch}.{key}", default)  # noqa: E731
    heads = a("attention.head_count")
    hidden = a("embedding_length")
    names = {t.name for t in reader.tensors}
    vocab = a("vocab_size") or len(gguf_field(reader, "tokenizer.ggml.tokens", []))
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    scaling = None
    if a("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": a("rope.scaling.factor")}
    if "rope_freqs.weight" in names:
        raise ValueError("GGUF files with a rope_freqs tensor (Llama 3.1 scaling) are not supported yet; "
                         "use the HF checkpoint")
    return ModelConfig(
        architecture=_ARCHITECTURES[arch],
        name=gguf_served_name(path, lambda key: gguf_field(reader, key)),
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=a("feed_forward_length"),
        num_layers=a("block_count"),
        num_heads=heads,
        num_kv_heads=a("attention.head_count_kv", heads),
        head_dim=a("attention.key_length") or hidden // heads,
        rms_norm_eps=a("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=a("rope.freq_base", 10000.0),
        max_position_embeddings=a("context_length", 2048),
        tie_word_embeddings="output.weight" not in names,
        rope_scaling=scaling,
        eos_token_ids=() if eos is None else (eos,),
        bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
    )


def hf_name(gguf_name: str) -> str:
    m = _BLOCK.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{_GGUF_TO_HF[part]}.{kind}"
    base, kind = gguf_name.rsplit(".", 1)
    return f"{_GGUF_TO_HF[base]}.{kind}"


def unpermute_rotary(w, n_heads: int):
    """Inverse of llama.cpp's q/k row permutation: per head, rows (pair, half) -> (half, pair). Works on numpy
    arrays and torch tensors with rows first (weights, and a quantized layer's qweight / scales / offsets)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rotary_heads(name: str, cfg: ModelConfig) -> int | None:
    """The head count whose rows llama.cpp permuted in this tensor (q and k projections), else None."""
    if name.endswith("self_attn.q_proj.weight"):
        return cfg.num_heads
    if name.endswith("self_attn.k_proj.weight"):
        return cfg.num_kv_heads
    return None


def iter_gguf_weights(path: Path, lazy: bool = False) -> _Sized:
    """lazy: yield GGUF tensors read by parts (engine_svc.loader.gguf_lazy, for tensor-parallel ranks) instead of
    whole dequantized tensors."""
    reader = open_gguf(path)
    cfg = gguf_model_config(path)

    def gen() -> Iterator[tuple[str, torch.Tensor]]:
        from engine_svc.loader.gguf_lazy import GGUFTensorPart
        for t in reader.tensors:
            name = hf_name(t.name)
            yield name, GGUFTensorPart(t, name, cfg) if lazy else dequantized_tensor(t, name, cfg)

    return _Sized(gen(), len(reader.tensors))


def dequantized_tensor(t: ReaderTensor, name: str, cfg: ModelConfig) -> torch.Tensor:
    """One GGUF tensor as float32 in HF's layout (q/k rows un-permuted)."""
    w = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32, copy=False)
    w = w.reshape([int(d) for d in reversed(t.shape.tolist())])
    heads = rotary_heads(name, cfg)
    if heads:
        w = unpermute_rotary(w, heads)
    if not w.flags.writeable or not w.flags.c_contiguous:  # F32 tensors are views of the read-only map
        w = np.array(w, order="C")
    return torch.from_numpy(w)
