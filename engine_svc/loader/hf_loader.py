"""Weights from an HF directory of safetensors files (single or sharded with model.safetensors.index.json)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open


class _Sized:
    def __init__(self, it: Iterator, total: int) -> None:
        self._it, self.total = it, total

    def __iter__(self):
        return self._it


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    return files


def iter_safetensors(path: Path, lazy: bool = False) -> _Sized:
    """lazy: yield safetensors slices (read with engine_svc.distributed.read_part.read_part before the next item) instead
    of whole tensors."""
    files = safetensors_files(path)
    total = 0
    for f in files:
        with safe_open(f, framework="pt") as sf:
            total += len(list(sf.keys()))

    def gen() -> Iterator[tuple[str, torch.Tensor]]:
        for f in files:
            with safe_open(f, framework="pt") as sf:
                for name in sf.keys():
                    yield name, sf.get_slice(name) if lazy else sf.get_tensor(name)

    return _Sized(gen(), total)
