"""Which adapter slot each token of a step uses, as the LoRA layers read it.

The host plan (plan_tokens) is built in the model runner's prepare() from each scheduled request's slot (-1: the
base model) and goes through the persistent input buffers (fixed addresses: decode CUDA graphs read them):
  lora_token_slots  [T]          the slot of every token (the torch path groups tokens by it);
  lora_sorted_tokens[T]          the adapter tokens grouped by slot (base tokens are left out);
  lora_tile_*       [num_tiles]  runs of at most TILE tokens of one slot: offset into sorted_tokens, length, slot.
num_tiles depends only on T (a tile holds >= 1 token, and each slot adds at most one partial tile), so a kernel
grid over the tiles is fixed for a given step size.
"""
from __future__ import annotations

import torch

from engine_svc.kernels.lora_tile import TILE

FIELDS = ("lora_token_slots", "lora_sorted_tokens", "lora_tile_start", "lora_tile_len", "lora_tile_slot")


def num_tiles(num_tokens: int, max_loras: int) -> int:
    return min(num_tokens, -(-num_tokens // TILE) + max_loras)


def plan_tokens(request_slots: list[int], request_lens: list[int], num_tokens: int,
                max_loras: int) -> dict[str, list[int]]:
    """The host lists of FIELDS for requests laid out one after another (request i has request_lens[i] tokens);
    tokens past the requests (graph padding, up to num_tokens) use the base model. Tile lists are padded with empty
    tiles to num_tiles(num_tokens)."""
    token_slots: list[int] = []
    by_slot: dict[int, list[range]] = {}
    pos = 0
    for slot, n in zip(request_slots, request_lens):
        token_slots.extend([slot] * n)
        if slot >= 0:
            by_slot.setdefault(slot, []).append(range(pos, pos + n))
        pos += n
    token_slots.extend([-1] * (num_tokens - pos))
    sorted_tokens: list[int] = []
    starts, lens, slots = [], [], []
    for slot in sorted(by_slot):
        begin = len(sorted_tokens)
        for r in by_slot[slot]:
            sorted_tokens.extend(r)
        for t0 in range(begin, len(sorted_tokens), TILE):
            starts.append(t0)
            lens.append(min(TILE, len(sorted_tokens) - t0))
            slots.append(slot)
    pad = num_tiles(num_tokens, max_loras) - len(starts)
    return {"lora_token_slots": token_slots,
            "lora_sorted_tokens": sorted_tokens + [0] * (num_tokens - len(sorted_tokens)),
            "lora_tile_start": starts + [0] * pad, "lora_tile_len": lens + [0] * pad, "lora_tile_slot": slots + [-1] * pad}


class LoRABatch:
    """The state every LoRA layer of a model shares: the step's token plan (device views, bound per step) and each
    slot's rank (slot_ranks, int32 [max_loras]; 0 for an empty slot), kept by the LoRAManager."""

    def __init__(self, max_loras: int, device: torch.device, use_kernel: bool) -> None:
        self.max_loras = max_loras
        self.use_kernel = use_kernel
        self.slot_ranks = torch.zeros(max_loras, dtype=torch.int32, device=device)
        self.active = False          # False: no token of the step uses an adapter; the layers add nothing
        self.tensors: dict[str, torch.Tensor] = {}

    def bind(self, device_tensors: dict[str, torch.Tensor], num_tokens: int, active: bool) -> None:
        """Points the layers at the first num_tokens entries of the persistent buffers (whose contents the runner
        fills each step). active=True while capturing a CUDA graph: the graph must hold the kernels."""
        tiles = num_tiles(num_tokens, self.max_loras)
        self.tensors = {name: device_tensors[name][:num_tokens if name in FIELDS[:2] else tiles] for name in FIELDS}
        self.active = active
