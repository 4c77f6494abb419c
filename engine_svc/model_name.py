"""The name a model is served under when --served-model-name does not give one (GetModelInfo, the metrics'
model_name label).

A GGUF is named after its file, less the quantization and shard suffixes: GGUF files are published as
`<model>.<quant>.gguf` or `<model>-<quant>.gguf`, so the stem is the model's published name
(SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct), while `general.name` is often a converter's
title-cased guess ("Smollm2 135M 8k Lc100K Mix1 Ep2"). Only a file named generically (model.gguf) falls back to
the metadata: basename, size label, fine-tune and version joined as llama.cpp's naming convention does, then
general.name. An HF directory is named after itself, or after its repository in an HF hub cache snapshot.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

_SHARD = re.compile(r"-\d{5}-of-\d{5}$")
# Quantization and precision tags as llama.cpp and the GGUF publishers write them: Q4_1, Q4_K_M, IQ2_XXS, TQ1_0,
# F16, BF16, ... after a '.', '-' or '_'.
_QUANT = re.compile(r"[._-](?:[IT]?Q\d+(?:_[A-Z0-9]+)*|B?F16|F32|FP16|FP32|MXFP4)$", re.IGNORECASE)
_GENERIC_STEMS = {"model", "ggml-model", "gguf-model"}
_GGUF_NAME_PARTS = ("general.basename", "general.size_label", "general.finetune", "general.version")


def gguf_served_name(path: Path, metadata: Callable[[str], str | None]) -> str:
    """`metadata(key)` is the GGUF's string field for key, or None when absent."""
    stem = _QUANT.sub("", _SHARD.sub("", path.stem))
    if stem and stem.lower() not in _GENERIC_STEMS:
        return stem
    composed = "-".join(part for part in (metadata(key) for key in _GGUF_NAME_PARTS) if part)
    return composed or metadata("general.name") or path.stem


def hf_dir_served_name(path: Path) -> str:
    """The directory's name; for an HF hub cache snapshot (models--Org--Name/snapshots/<commit>) the repo's."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--", 2)[-1]
    return path.name
