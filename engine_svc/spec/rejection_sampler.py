"""Verification of proposed tokens: the standard rejection rule of speculative sampling, batched on the device.

A verify row of a request proposes k tokens d_1..d_k after its last token; the target's forward gives its
distribution p_j at each of the k + 1 positions. Proposal j is accepted with probability min(1, p_j(d_j) /
q_j(d_j)), in order, until the first rejection. At a rejection the target's token is drawn from the residual
max(0, p_j - q_j), normalized; when all k are accepted it is drawn from p_{k+1} (the bonus token). Each emitted
token is then distributed exactly as the target's sample would be. q_j is the proposer's distribution: the draft
model's, or for n-gram lookup a point mass at d_j (accept with probability p_j(d_j); the residual is p_j with d_j
removed).

p_j is the distribution the sampler would draw from (engine_svc.sampling.sampler: processors, temperature, min-p, top-k,
top-p). A greedy row's p_j is the one-hot of its argmax, so the rule reduces to: accept the longest prefix that
matches the target's argmax, then emit the argmax. Greedy output is identical to decoding without proposals (up
to the ties that a different kernel's rounding can break: the verify forward is a prefill over k + 1 positions).

Randomness: the acceptance uniform and the final token's exponential race come from the sampler's counter-based
hash, keyed per (row key, output index): a seeded request's draws do not depend on the batch. The acceptance
draws use a salted key, independent of the race's and of the draft model's own draws.
"""
from __future__ import annotations

import torch

from engine_svc.sampling.sampler import SamplingBatch, apply_top_k_top_p, exponential_noise, scaled_logits

_ACCEPT_SALT = 0x2545F491   # xor-ed into a row key for its acceptance uniforms


def target_probs(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """[N, V] logits (after the processors) -> the distribution each row samples from; a greedy row's is the
    one-hot of its argmax."""
    greedy = torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(torch.float32)
    if b.all_greedy:
        return greedy
    probs = apply_top_k_top_p(scaled_logits(logits, b), b).softmax(dim=-1)
    return torch.where((b.temperature > 0)[:, None], probs, greedy)


def uniforms(row_keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """A uniform in (0, 1) per (row key, token): exp(-E) of the salted key's exponential noise."""
    return torch.exp(-exponential_noise(row_keys ^ _ACCEPT_SALT, token_ids[:, None]))[:, 0]


def rejection_sample(p: torch.Tensor, proposals: torch.Tensor, num_proposed: torch.Tensor,
                     q: torch.Tensor | None, keys: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Verifies R rows of padded proposals.
    p [R, K + 1, V]: the target's distributions; proposals [R, K] (padding: any id); num_proposed [R] (k of each
    row, >= 1); q [R, K, V] the proposer's distributions, or None for point masses; keys [R, K + 1] the row keys
    per position (None when every row is greedy: no draw is random).
    Returns (num_accepted [R], final token [R]): the row's new tokens are proposals[:num_accepted] + final."""
    R, K = proposals.shape
    rows = torch.arange(R, device=p.device)
    p_d = p[:, :K].gather(-1, proposals[..., None])[..., 0]                        # [R, K]
    q_d = torch.ones_like(p_d) if q is None else q.gather(-1, proposals[..., None])[..., 0]
    if keys is None:
        u = torch.full_like(p_d, 0.5)   # greedy: p_d is 0 or 1, any u in (0, 1) decides alike
    else:
        u = uniforms(keys[:, :K].reshape(-1), proposals.reshape(-1)).view(R, K)
    # u < min(1, p/q), without dividing: q_d > 0 for a token the proposer drew.
    accept = (u * q_d < p_d) & (torch.arange(K, device=p.device)[None, :] < num_proposed[:, None])
    num_accepted = accept.to(torch.int64).cumprod(dim=-1).sum(dim=-1)
    p_final = p[rows, num_accepted]                                                 # [R, V]
    rejected = num_accepted < num_proposed
    at = num_accepted.clamp(max=K - 1)
    if q is None:
        residual = p_final.scatter(-1, proposals[rows, at][:, None], 0.0)
    else:
        residual = (p_final - q[rows, at]).clamp_min(0.0)
    # A residual of no mass comes only from rounding (rejection then has probability ~0): draw from p instead.
    use_residual = rejected & (residual.sum(dim=-1) > 0)
    w = torch.where(use_residual[:, None], residual, p_final)
    if keys is None:
        final = w.argmax(dim=-1)
    else:
        vocab = torch.arange(w.shape[-1], device=w.device)
        final = (w / exponential_noise(keys[rows, num_accepted], vocab)).argmax(dim=-1)
    return num_accepted, final


def pad_rows(rows: list[list[int]], width: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int64, device=device)
