"""The Triton multi-LoRA kernels (shrink + expand over the host's token plan) against a per-token reference that
gathers each token's own A and B, and the torch path against the same reference: fp32 under the interpreter on the
CPU (compiled on a GPU), base-model tokens (slot -1) mixed in, ranks below r_max, fused projections with uneven
slices, runs longer than a tile and K split in parts. On a GPU also bf16 at the Llama-3-8B shapes."""
from __future__ import annotations

import pytest
import torch

from engine_svc.kernels.lora_sgmv import add_lora, k_splits
from engine_svc.lora.batch import LoRABatch, num_tiles, plan_tokens
from engine_svc.lora.torch_ops import add_lora_torch


def make_case(slices, fan_in, r_max, ranks, request_slots, request_lens, device, dtype=torch.float32, seed=0,
              pad_garbage=False):
    g = torch.Generator().manual_seed(seed)
    L, S = len(ranks), len(slices)
    out = sum(slices)
    a = torch.zeros(L, S * r_max, fan_in)
    b = torch.zeros(L, out, r_max)
    for slot, r in enumerate(ranks):
        for j in range(S):
            a[slot, j * r_max:j * r_max + r] = torch.randn(r, fan_in, generator=g) * 0.3
        b[slot, :, :r] = torch.randn(out, r, generator=g) * 0.3
    if pad_garbage:   # what lies past a slot's rank must never be read by the kernels
        for slot, r in enumerate(ranks):
            for j in range(S):
                a[slot, j * r_max + r:(j + 1) * r_max] = 1e3
            b[slot, :, r:] = 1e3
    T = sum(request_lens)
    x = torch.randn(T, fan_in, generator=g)
    y0 = torch.randn(T, out, generator=g)
    token_slots = [s for s, n in zip(request_slots, request_lens) for _ in range(n)]
    expected = y0.clone()
    bounds = [0]
    for s in slices:
        bounds.append(bounds[-1] + s)
    for t, slot in enumerate(token_slots):   # the reference: each token with its own adapter's weights, truncated
        if slot < 0:
            continue
        r = ranks[slot]
        for j in range(S):
            shrunk = x[t] @ a[slot, j * r_max:j * r_max + r].t()
            expected[t, bounds[j]:bounds[j + 1]] += shrunk @ b[slot, bounds[j]:bounds[j + 1], :r].t()
    plan = plan_tokens(request_slots, request_lens, T, L)
    batch = LoRABatch(L, torch.device(device), use_kernel=True)
    batch.slot_ranks.copy_(torch.tensor(ranks, dtype=torch.int32))
    batch.bind({k: torch.tensor(v, dtype=torch.int32, device=device) for k, v in plan.items()}, T, active=True)
    put = lambda t: t.to(device=device, dtype=dtype)
    return dict(x=put(x), y=put(y0), a=put(a), b=put(b), batch=batch, expected=expected,
                bounds=torch.tensor(bounds, dtype=torch.int32, device=device), slices=tuple(slices))


def run_kernel(c):
    t = c["batch"].tensors
    y = c["y"].clone()
    add_lora(y, c["x"], c["a"], c["b"], c["batch"].slot_ranks, c["bounds"], t["lora_sorted_tokens"],
             t["lora_tile_start"], t["lora_tile_len"], t["lora_tile_slot"])
    return y


CASES = {
    # slices (fused q|k|v-like, uneven, not multiples of the 64-column block), K, r_max, slot ranks, requests
    "qkv-mixed": ([40, 24, 24], 48, 16, [4, 8, 16], [-1, 0, 2, 1, -1, 0], [3, 5, 1, 2, 4, 1]),
    "long-run-and-split-k": ([96], 1100, 8, [8, 3], [1, -1, 1, 0], [20, 3, 1, 17]),
    "gate-up-decode": ([72, 72], 32, 16, [16, 2, 5, 0], [0, 1, 2, 0, 1, 2, 0, -1], [1] * 8),
    "all-base": ([64], 32, 16, [4], [-1, -1], [3, 1]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_equals_per_token_reference(name, device):
    c = make_case(*CASES[name], device=device, pad_garbage=True)
    torch.testing.assert_close(run_kernel(c).cpu(), c["expected"], rtol=1e-4, atol=1e-4)


def test_split_k_case_really_splits():
    # long-run-and-split-k: 41 tokens, 2 adapters -> 5 tiles x 1 rank block; K = 1100 in 3 parts (the last short)
    assert k_splits(1100, 5) == (3, 384)


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_path_equals_per_token_reference(name):
    c = make_case(*CASES[name], device="cpu")
    y = c["y"].clone()
    add_lora_torch(y, c["x"], c["a"], c["b"], c["batch"].tensors["lora_token_slots"], c["slices"])
    torch.testing.assert_close(y, c["expected"], rtol=1e-4, atol=1e-4)


def test_kernel_with_more_tiles_than_full_ones(device):
    """Every slot's run ends in a partial tile (17 tokens: 16 + 1), decode tokens interleaved with the runs."""
    slots, lens = [0, 1, 2, 0, 1, -1, 3], [17, 16, 1, 1, 1, 2, 1]
    plan = plan_tokens(slots, lens, sum(lens), 4)
    assert [n for n in plan["lora_tile_len"] if n] == [16, 2, 16, 1, 1, 1]
    c = make_case([32], 32, 16, [4, 16, 7, 1], slots, lens, device=device, pad_garbage=True)
    torch.testing.assert_close(run_kernel(c).cpu(), c["expected"], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("slices,fan_in", [([4096, 1024, 1024], 4096), ([14336, 14336], 4096), ([4096], 14336)])
def test_kernel_half_precision_llama3_8b_shapes(dtype, slices, fan_in):
    requests = [-1, 0, 1, 2, 3, 4, 5, 6, 7] * 7 + [3, -1]
    c = make_case(slices, fan_in, 16, [16] * 8, requests, [1] * 63 + [300, 40], device="cuda", dtype=dtype)
    # The reference is fp32 from unrounded inputs, outputs reach ~100: a 16-bit result is off by a few of its own
    # ulps of the largest values (bf16: 2^-8 relative, fp16: 2^-11), wherever the element itself is small.
    scale = c["expected"].abs().max().item()
    ulps = {torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(run_kernel(c).float().cpu(), c["expected"], rtol=0, atol=ulps * scale)
