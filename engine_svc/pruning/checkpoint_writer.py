"""Writes the pruned HF directory, streaming: the input's tensors are read one at a time, each decoder linear's
weight pruned on the way, and written out in safetensors shards of at most max_shard_bytes. Memory holds one
input tensor and one shard, whatever the model's size.

Every other tensor (embeddings, norms, lm_head, biases) is written unchanged, in the dtype it was read in (an HF
input's own; float32 for a GGUF input, its dequantized values).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from engine_svc.models.llama import fused_module_name
from engine_svc.pruning.hf_export import source_hf_config, write_tokenizer_files
from engine_svc.pruning.masks import pattern_problem
from engine_svc.pruning.scores import pruned
from engine_svc.pruning.sparsity_config import KEY, sparsity_entry
from engine_svc.pruning.spec import PruneConfig

# HF names of the decoder linears' weights: Llama-shaped families and Falcon. lm_head and embeddings are never
# pruned (the published methods leave them dense: they are the most sensitive matrices).
_DECODER_WEIGHT = re.compile(r"^(?P<module>.*\.(?:layers|h)\.\d+\..*\.(?P<leaf>q_proj|k_proj|v_proj|o_proj|gate_proj|"
                             r"up_proj|down_proj|query_key_value|dense|dense_h_to_4h|dense_4h_to_h))\.weight$")


def decoder_linear(name: str) -> tuple[str, str] | None:
    """(module name, leaf) for a decoder linear's weight, else None."""
    match = _DECODER_WEIGHT.match(name)
    return (match.group("module"), match.group("leaf")) if match else None


def source_tensors(source: Path):
    """The input's tensors in HF names and layout, one at a time (with .total, their count)."""
    if source.is_dir():
        from engine_svc.loader.hf_loader import iter_safetensors
        return iter_safetensors(source)
    from engine_svc.loader.gguf_loader import iter_gguf_weights
    return iter_gguf_weights(source)


@dataclass
class WriteSummary:
    pruned_layers: int = 0
    pruned_weights: int = 0       # zeros in the pruned matrices
    pruned_matrix_weights: int = 0   # all weights of the pruned matrices
    bytes_written: int = 0
    shards: list[str] = field(default_factory=list)

    @property
    def zero_fraction(self) -> float:
        return self.pruned_weights / max(self.pruned_matrix_weights, 1)


class _ShardWriter:
    def __init__(self, output: Path, max_bytes: int) -> None:
        self.output, self.max_bytes = output, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[Path] = []
        self.weight_map: dict[str, int] = {}   # tensor -> shard index

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.weight_map[name] = len(self.files)

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.output / f"model-part-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append(path)
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Gives the shards HF's names (model.safetensors alone, else -NNNNN-of-NNNNN with an index)."""
        self.flush()
        if len(self.files) == 1:
            self.files[0].rename(self.output / "model.safetensors")
            return ["model.safetensors"]
        names = [f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors" for i in range(len(self.files))]
        for path, name in zip(self.files, names):
            path.rename(self.output / name)
        total = sum((self.output / n).stat().st_size for n in names)
        index = {"metadata": {"total_size": total},
                 "weight_map": {t: names[i] for t, i in sorted(self.weight_map.items())}}
        (self.output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def _clear_previous(output: Path) -> None:
    """--overwrite: an earlier run's shards would otherwise sit beside (and be loaded with) the new ones."""
    for path in [*output.glob("*.safetensors"), output / "model.safetensors.index.json"]:
        path.unlink(missing_ok=True)


def write_pruned_checkpoint(config: PruneConfig, norms: dict[str, torch.Tensor] | None,
                            on_tensor: Callable[[str], None] = lambda name: None,
                            calibration: dict | None = None) -> WriteSummary:
    """norms: Wanda's activation norms by engine module (calibration.calibrated_norms); None prunes by magnitude.
    Every pruned matrix is checked against the pattern before it is written."""
    spec = config.sparsity
    hf_config = source_hf_config(config.source)
    config.output.mkdir(parents=True, exist_ok=True)
    _clear_previous(config.output)
    writer = _ShardWriter(config.output, config.max_shard_bytes)
    summary, targets = WriteSummary(), []
    for name, tensor in source_tensors(config.source):
        linear = decoder_linear(name)
        if linear is not None:
            module, leaf = linear
            norm = None
            if norms is not None:
                key = fused_module_name(module)
                if key not in norms:
                    raise RuntimeError(f"no activation norms for {name} (engine module {key})")
                norm = norms[key]
            tensor = pruned(tensor, spec, norm)
            problem = pattern_problem(tensor, spec)
            if problem:
                raise RuntimeError(f"{name} after pruning: {problem}")
            summary.pruned_layers += 1
            summary.pruned_weights += int((tensor == 0).sum())
            summary.pruned_matrix_weights += tensor.numel()
            targets.append(leaf)
        summary.bytes_written += tensor.numel() * tensor.element_size()
        writer.add(name, tensor)
        on_tensor(name)
    if not targets:
        raise ValueError(f"{config.source} has no decoder linear weights to prune")
    summary.shards = writer.finish()
    hf_config[KEY] = sparsity_entry(spec, config.method, targets, calibration)
    (config.output / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    write_tokenizer_files(config.source, config.output)
    return summary
