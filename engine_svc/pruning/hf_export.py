"""What a pruned HF directory needs besides its weights: config.json and the tokenizer files, copied from an HF
input or, for a GGUF input, written from its metadata (the GGUF loaders serve Llama-architecture files only)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from engine_svc.model_config import ModelConfig

# Everything a tokenizer or generation setting may live in, in an HF directory; copied as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def source_hf_config(source: Path) -> dict[str, Any]:
    """The input's config.json as a dict: read from an HF directory, composed from a GGUF's hyper-parameters."""
    if source.is_dir():
        return json.loads((source / "config.json").read_text())
    from engine_svc.loader.gguf_loader import gguf_model_config
    return llama_hf_config(gguf_model_config(source))


def llama_hf_config(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """An HF LlamaConfig dict that ModelConfig.from_hf_dict (and transformers) read back as `cfg`."""
    eos = list(cfg.eos_token_ids)
    return {"architectures": [cfg.architecture], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
            "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": torch_dtype}


def write_tokenizer_files(source: Path, output: Path) -> list[str]:
    """Copies (HF input) or writes (GGUF input) the tokenizer files; returns their names."""
    if source.is_dir():
        copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
        for name in copied:
            shutil.copyfile(source / name, output / name)
        return copied
    from tokenizer_svc.loading import load_tokenizer

    tok = load_tokenizer(source)
    tok.tokenizer.save(str(output / "tokenizer.json"))
    vocab = tok.tokenizer

    def token(i: int | None) -> str | None:
        return None if i is None else vocab.id_to_token(i)

    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token(tok.bos_token_id),
                              "eos_token": token(tok.eos_token_ids[0] if tok.eos_token_ids else None),
                              "add_bos_token": tok.add_bos_token, "clean_up_tokenization_spaces": False}
    if tok.chat_template is not None:
        config["chat_template"] = tok.chat_template.source
    (output / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    generation = {"bos_token_id": tok.bos_token_id, "eos_token_id": list(tok.eos_token_ids)}
    (output / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
