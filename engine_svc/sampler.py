"""Batched sampling on the device: greedy, temperature, top-k, top-p and per-request seeds.

Sampling uses the exponential race: argmax(p / E) with E ~ Exp(1) draws from p. Seeded requests draw E from a
generator seeded by (seed, output index), so a request's samples do not depend on what else is in the batch, nor
on preemption.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_MASKED = float("-inf")


@dataclass
class SamplingBatch:
    temperature: torch.Tensor   # [N] float32; 0 = greedy
    top_p: torch.Tensor         # [N] float32
    top_k: torch.Tensor         # [N] int64; vocab size when off
    seeds: list[tuple[int, int, int]]   # (row, seed, output index) of seeded rows
    all_greedy: bool
    needs_top_k: bool
    needs_top_p: bool

    @classmethod
    def build(cls, params: list, output_lens: list[int], vocab_size: int, device: torch.device) -> "SamplingBatch":
        temps = [p.temperature for p in params]
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        top_p = [p.top_p for p in params]
        seeds = [(i, p.seed, n) for i, (p, n) in enumerate(zip(params, output_lens))
                 if p.seed is not None and p.temperature > 0]
        return cls(
            temperature=torch.tensor(temps, dtype=torch.float32, device=device),
            top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            seeds=seeds,
            all_greedy=all(t == 0 for t in temps),
            needs_top_k=any(k < vocab_size for k in top_k),
            needs_top_p=any(p < 1.0 for p in top_p),
        )


def apply_top_k_top_p(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Masks logits outside each row's top-k and top-p nucleus (the nucleus always keeps the best token)."""
    if not (b.needs_top_k or b.needs_top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= b.top_k[:, None]
    if b.needs_top_p:
        probs = sorted_logits.masked_fill(drop, _MASKED).softmax(dim=-1)
        # A token is dropped when the mass strictly before it already reaches top_p.
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= b.top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, _MASKED)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _seed_for(seed: int, index: int) -> int:
    # SplitMix64-style mixing so nearby (seed, index) pairs give unrelated streams.
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def sample(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """logits [N, V] float32 -> sampled ids [N] int64, on the same device, with no host sync."""
    greedy = logits.argmax(dim=-1)
    if b.all_greedy:
        return greedy
    temps = torch.where(b.temperature > 0, b.temperature, torch.ones_like(b.temperature))
    probs = apply_top_k_top_p(logits / temps[:, None], b).softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for row, seed, index in b.seeds:
        gen = torch.Generator(device=probs.device).manual_seed(_seed_for(seed, index))
        noise[row].exponential_(generator=gen)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(b.temperature > 0, sampled, greedy)
