"""Batched logits processors: penalties, min-p, logit bias, allowed tokens, token suppression and grammar masks.

Every function works on the whole batch [N, V] at once on the device; per-request values come as [N] tensors and
per-request token lists as padded [N, L] id tensors (pad = -1). There is no Python loop over the vocabulary.
Semantics follow the usual definitions:
- repetition_penalty (CTRL paper, as in HF/vLLM): a token seen in the prompt or the output has its logit divided
  by the penalty when positive and multiplied by it when negative; 1 is off;
- presence_penalty / frequency_penalty (OpenAI): subtract presence * [count > 0] + frequency * count, counting
  output tokens only; 0 is off;
- min_p: drop tokens whose probability is below min_p times the top token's; 0 is off;
- a grammar bitmask (structured output): bit j of a row's mask allows token j, as xgrammar packs it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_MASKED = float("-inf")


def token_counts(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """ids [N, L] int64 padded with -1 -> counts [N, V] int32."""
    n = ids.shape[0]
    counts = torch.zeros(n, vocab_size + 1, dtype=torch.int32, device=ids.device)
    padded = torch.where(ids < 0, vocab_size, ids)        # the pad lands in an extra column, dropped below
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.int32))
    return counts[:, :vocab_size]


@dataclass
class Penalties:
    """The penalized rows of a batch and what they have seen: from id histories (penalties_of_histories) or kept on
    the device across steps (engine_svc/sampling/penalty_state.py)."""
    rows: torch.Tensor          # [M] int64: the batch rows that use penalties
    prompt_seen: torch.Tensor   # [M, V] bool: in the row's prompt
    counts: torch.Tensor        # [M, V] int32: how often the row has output each token
    repetition: torch.Tensor    # [M] float32
    presence: torch.Tensor      # [M] float32
    frequency: torch.Tensor     # [M] float32


def penalties_of_histories(prompt_ids: torch.Tensor, output_ids: torch.Tensor, repetition: torch.Tensor,
                           presence: torch.Tensor, frequency: torch.Tensor, vocab_size: int) -> Penalties:
    """Every row's penalties from its padded prompt and output ids ([N, L], pad -1)."""
    rows = torch.arange(prompt_ids.shape[0], device=prompt_ids.device)
    return Penalties(rows, token_counts(prompt_ids, vocab_size) > 0, token_counts(output_ids, vocab_size),
                     repetition, presence, frequency)


def apply_penalties(logits: torch.Tensor, prompt_ids: torch.Tensor, output_ids: torch.Tensor,
                    repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    return apply_penalty_counts(logits, penalties_of_histories(prompt_ids, output_ids, repetition, presence,
                                                               frequency, logits.shape[-1]))


def apply_penalty_counts(logits: torch.Tensor, p: Penalties) -> torch.Tensor:
    """Out of place: the logits may be a CUDA graph's output buffer."""
    sub = logits[p.rows]
    seen = p.prompt_seen | (p.counts > 0)
    rep = p.repetition[:, None]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - p.presence[:, None] * (p.counts > 0) - p.frequency[:, None] * p.counts
    return logits.index_put((p.rows,), sub)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, _MASKED)   # the top token always survives (min_p <= 1)


def apply_logit_bias(logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor,
                     biases: torch.Tensor) -> torch.Tensor:
    """Adds biases[i] to logits[rows[i], token_ids[i]] (flattened over all requests' biases)."""
    return logits.index_put((rows, token_ids), biases.to(logits.dtype), accumulate=True)


def keep_only(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """allowed [N, V] bool; rows that allow everything are unchanged."""
    return logits.masked_fill(~allowed, _MASKED)


def suppress(logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Forbids token_ids[i] in row rows[i], e.g. EOS and stop ids before min_tokens."""
    return logits.index_put((rows, token_ids), torch.tensor(_MASKED, dtype=logits.dtype, device=logits.device))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Forbids, in each listed row, the tokens whose bit is 0 in bitmask (xgrammar's kernel: C++ on the CPU,
    Triton on CUDA; one call for the batch). In place; only called when a row is constrained, so xgrammar is
    loaded by then."""
    from xgrammar import apply_token_bitmask_inplace

    apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1], indices=rows)
    return logits
