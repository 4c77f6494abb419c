"""The host token plan the LoRA kernels read: exact contents, and the bound that lets one grid (and one CUDA graph)
serve every plan of a step size."""
from __future__ import annotations

import random

from engine_svc.kernels.lora_tile import TILE
from engine_svc.lora.batch import num_tiles, plan_tokens


def test_plan_groups_tokens_by_slot_and_cuts_tiles():
    # requests: base (2 tokens), slot 1 (3), slot 0 (1), slot 1 (1); padded to 9 tokens (graph padding)
    plan = plan_tokens([-1, 1, 0, 1], [2, 3, 1, 1], 9, max_loras=2)
    assert plan["lora_token_slots"] == [-1, -1, 1, 1, 1, 0, 1, -1, -1]
    assert plan["lora_sorted_tokens"] == [5, 2, 3, 4, 6, 0, 0, 0, 0]
    assert plan["lora_tile_start"] == [0, 1, 0]
    assert plan["lora_tile_len"] == [1, 4, 0]
    assert plan["lora_tile_slot"] == [0, 1, -1]
    assert num_tiles(9, 2) == 3


def test_long_runs_are_cut_into_tiles():
    plan = plan_tokens([0], [2 * TILE + 3], 2 * TILE + 3, max_loras=1)
    assert plan["lora_tile_start"][:3] == [0, TILE, 2 * TILE]
    assert plan["lora_tile_len"][:3] == [TILE, TILE, 3]


def test_tiles_never_exceed_the_grid_of_their_step_size():
    rng = random.Random(0)
    for _ in range(500):
        max_loras = rng.randint(1, 6)
        lens = [rng.choice([1, 1, 1, rng.randint(1, 40)]) for _ in range(rng.randint(1, 12))]
        slots = [rng.randint(-1, max_loras - 1) for _ in lens]
        total = sum(lens)
        plan = plan_tokens(slots, lens, total, max_loras)
        assert len(plan["lora_tile_len"]) == num_tiles(total, max_loras)
        covered = sorted(t for s, n in zip(plan["lora_tile_start"], plan["lora_tile_len"])
                         for t in plan["lora_sorted_tokens"][s:s + n])
        assert covered == [t for t, s in enumerate(plan["lora_token_slots"]) if s >= 0]
        for s, n, slot in zip(plan["lora_tile_start"], plan["lora_tile_len"], plan["lora_tile_slot"]):
            assert all(plan["lora_token_slots"][t] == slot for t in plan["lora_sorted_tokens"][s:s + n])
