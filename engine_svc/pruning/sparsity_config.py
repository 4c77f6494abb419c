"""The `sparsity_config` entry `tandem prune` writes into config.json, and its parser for the loader.

    "sparsity_config": {"format": "dense", "structure": "2:4", "sparsity": 0.5, "method": "wanda",
                        "targets": ["down_proj", "gate_proj", ...], "ignore": ["lm_head"],
                        "calibration": {"text": "alice_in_wonderland.txt", "tokens": 2048}}

- format "dense": the zeros are stored as zeros in ordinary tensors, so any loader (transformers among them, which
  keeps unknown config keys as attributes) reads the checkpoint as a dense model;
- structure: "N:M" (N of every M consecutive input weights of a row kept) or "unstructured";
- sparsity: the share of zeros in each pruned matrix; targets: the leaf names of the pruned linears.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine_svc.pruning.spec import SparsitySpec, parse_sparsity

KEY = "sparsity_config"


@dataclass(frozen=True)
class CheckpointSparsity:
    spec: SparsitySpec
    method: str
    targets: tuple[str, ...]


def sparsity_entry(spec: SparsitySpec, method: str, targets: list[str], calibration: dict | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"format": "dense", "structure": spec.label() if spec.is_n_of_m else "unstructured",
                             "sparsity": round(spec.zero_fraction, 6), "method": method,
                             "targets": sorted(set(targets)), "ignore": ["lm_head"]}
    if calibration is not None:
        entry["calibration"] = calibration
    return entry


def parse_sparsity_config(hf_config: dict[str, Any]) -> CheckpointSparsity | None:
    """None when the checkpoint says nothing of sparsity; ValueError when what it says cannot be read."""
    entry = hf_config.get(KEY)
    if not entry:
        return None
    if not isinstance(entry, dict):
        raise ValueError(f"config.json {KEY} must be an object, got {type(entry).__name__}")
    if entry.get("format", "dense") != "dense":
        raise ValueError(f"{KEY} format {entry.get('format')!r} is not supported; only 'dense' (zeros stored)")
    structure = str(entry.get("structure", ""))
    try:
        spec = parse_sparsity(str(entry.get("sparsity")) if structure == "unstructured" else structure)
    except ValueError as err:
        raise ValueError(f"config.json {KEY}: {err}") from None
    return CheckpointSparsity(spec, str(entry.get("method", "unknown")), tuple(entry.get("targets") or ()))
