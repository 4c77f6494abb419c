"""Picks the loader for a model path: an HF directory or a GGUF file."""
from __future__ import annotations

from pathlib import Path

from tokenizer_svc.gguf_loading import load_gguf
from tokenizer_svc.hf_loading import load_hf_directory
from tokenizer_svc.loaded import LoadedTokenizer


def load_tokenizer(path: str | Path) -> LoadedTokenizer:
    path = Path(path).expanduser()
    if path.is_dir():
        return load_hf_directory(path)
    if path.is_file():
        return load_gguf(path)
    raise FileNotFoundError(f"no model at {path}")
