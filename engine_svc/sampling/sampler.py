"""Batched sampling on the device: logits processors, greedy, temperature, min-p, top-k, top-p and per-request
seeds. Order: penalties, logit bias, allowed tokens, min_tokens suppression and the grammar mask of structured
output change the logits of every row (greedy ones too); then temperature, min-p and top-k/top-p shape the
distribution of the sampled rows.

Sampling uses the exponential race: argmax(p / E) with E ~ Exp(1) draws from p. E comes from a counter-based hash of
(row key, token id), computed for the whole batch in one vectorised pass (no generator per row). A seeded row's key
is derived from (seed, output index), so a request's samples do not depend on what else is in the batch, nor on
preemption, nor on the device; an unseeded row takes a fresh random key each step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_svc.sampling import logits_processors as lp

_MASKED = float("-inf")
_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingBatch:
    temperature: torch.Tensor | None   # [N] float32; 0 = greedy. The three are None in an all-greedy batch.
    top_p: torch.Tensor | None         # [N] float32
    top_k: torch.Tensor | None         # [N] int64; vocab size when off
    row_keys: torch.Tensor | None       # [N] int64 32-bit noise keys; None in an all-greedy batch
    all_greedy: bool
    needs_top_k: bool
    needs_top_p: bool
    top_k_width: int                     # largest top-k of the batch, or the vocabulary size when a row has none
    # Processors; each is None when no row of the batch uses it.
    min_p: torch.Tensor | None = None
    penalties: lp.Penalties | None = None
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None   # (rows, token ids, biases)
    allowed: torch.Tensor | None = None                 # [N, V] bool (allowed_mask)
    suppressed: tuple[torch.Tensor, torch.Tensor] | None = None   # (rows, token ids)
    grammar: tuple[torch.Tensor, torch.Tensor] | None = None      # (bitmask [rows, ceil(V / 32)] int32, rows masked)

    @classmethod
    def build(cls, params: list, output_lens: list[int], vocab_size: int, device: torch.device, *,
              histories: list[tuple[list[int], list[int]]] | None = None, penalties: lp.Penalties | None = None,
              eos_token_ids: frozenset[int] = frozenset()) -> "SamplingBatch":
        """When a row uses penalties: penalties, the penalized rows' counts kept on the device (PenaltyState), or
        else histories, each row's (prompt ids, output ids)."""
        temps = [p.temperature for p in params]
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        top_p = [p.top_p for p in params]
        fresh = torch.randint(0, 1 << 32, (len(params),), dtype=torch.int64).tolist()   # the torch CPU generator
        keys = [_seed_for(p.seed, n) & _MASK32 if p.seed is not None else k
                for p, n, k in zip(params, output_lens, fresh)]
        all_greedy = all(t == 0 for t in temps)
        # An all-greedy batch (the common serving case) only takes an argmax: no per-row tensors to send.
        b = cls(
            temperature=None if all_greedy else to_device(temps, torch.float32, device),
            top_p=None if all_greedy else to_device(top_p, torch.float32, device),
            top_k=None if all_greedy else to_device(top_k, torch.int64, device),
            row_keys=None if all_greedy else to_device(keys, torch.int64, device),
            all_greedy=all_greedy,
            needs_top_k=any(k < vocab_size for k in top_k),
            needs_top_p=any(p < 1.0 for p in top_p),
            top_k_width=max(top_k),
        )
        f32 = dict(dtype=torch.float32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        if any(p.min_p > 0 for p in params):
            b.min_p = to_device([p.min_p for p in params], **f32)
        if penalties is not None:
            b.penalties = penalties
        elif any(p.uses_penalties for p in params):
            if histories is None:
                raise ValueError("penalties need each row's prompt and output ids")
            b.penalties = lp.penalties_of_histories(
                padded([h[0] for h in histories], device), padded([h[1] for h in histories], device),
                *penalty_values(params, device), vocab_size)
        bias = [(i, t, v) for i, p in enumerate(params) for t, v in p.logit_bias]
        if bias:
            rows, ids, vals = zip(*bias)
            b.bias = (to_device(rows, **i64), to_device(ids, **i64), to_device(vals, **f32))
        if any(p.allowed_token_ids is not None for p in params):
            b.allowed = allowed_mask([p.allowed_token_ids for p in params], vocab_size, device)
        banned = [(i, t) for i, (p, n) in enumerate(zip(params, output_lens)) if n < p.min_tokens
                  for t in sorted(p.stop_token_ids | (frozenset() if p.ignore_eos else eos_token_ids))]
        if banned:
            rows, ids = zip(*banned)
            b.suppressed = (to_device(rows, **i64), to_device(ids, **i64))
        return b


def penalty_values(params: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(repetition, presence, frequency) [N] float32 of the given rows."""
    return tuple(to_device([getattr(p, name) for p in params], torch.float32, device)
                 for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"))


def allowed_mask(allowed_ids: list[frozenset[int] | None], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[N, V] bool: each row's allowed ids (None: every id), made on the device by one scatter of the ids, so the
    host's work grows with the ids' count, not with the vocabulary."""
    restricted = [i for i, ids in enumerate(allowed_ids) if ids is not None]
    rows = [i for i in restricted for _ in allowed_ids[i]]
    ids = [t for i in restricted for t in allowed_ids[i]]
    i64 = dict(dtype=torch.int64, device=device)
    mask = torch.ones(len(allowed_ids), vocab_size, dtype=torch.bool, device=device)
    mask.index_fill_(0, to_device(restricted, **i64), False)
    return mask.index_put_((to_device(rows, **i64), to_device(ids, **i64)),
                           torch.ones((), dtype=torch.bool, device=device))


def padded(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return to_device([r + [-1] * (width - len(r)) for r in rows], torch.int64, device)


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list or tensor on the device without stalling the host: a pageable copy would wait for the device
    to finish everything queued before it (the forward pass); a pinned one is queued behind it instead."""
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def apply_processors(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Everything that changes the logits themselves, for greedy and sampled rows alike."""
    if b.penalties is not None:
        logits = lp.apply_penalty_counts(logits, b.penalties)
    if b.bias is not None:
        logits = lp.apply_logit_bias(logits, *b.bias)
    if b.allowed is not None:
        logits = lp.keep_only(logits, b.allowed)
    if b.suppressed is not None:
        logits = lp.suppress(logits, *b.suppressed)
    if b.grammar is not None:   # last: nothing after it may lift a token it forbids
        logits = lp.apply_token_bitmask(logits, *b.grammar)
    return logits


def apply_top_k_top_p(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Masks logits outside each row's top-k and top-p nucleus (the nucleus always keeps the best token)."""
    if not (b.needs_top_k or b.needs_top_p):
        return logits
    values, token_ids = top_k_top_p_candidates(logits, b)
    return torch.full_like(logits, _MASKED).scatter_(-1, token_ids, values)


def top_k_top_p_candidates(logits: torch.Tensor, b: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's candidates, most likely first: (logits with those outside the row's top-k and top-p nucleus at
    -inf, their token ids). When every row has a top-k, only the batch's largest k are kept, by a partial top-k
    instead of a sort."""
    vocab = logits.shape[-1]
    width = min(b.top_k_width, vocab)
    if width < vocab:
        values, token_ids = logits.topk(width, dim=-1)
    else:
        values, token_ids = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(width, device=logits.device)[None, :]
    drop = ranks >= b.top_k[:, None]
    if b.needs_top_p:
        probs = values.masked_fill(drop, _MASKED).softmax(dim=-1)
        # A token is dropped when the mass strictly before it already reaches top_p.
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= b.top_p[:, None]
    return values.masked_fill(drop, _MASKED), token_ids


def exponential_noise(row_keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise for each row's tokens (token_ids [vocab] shared by every row, or [N, k]): a 32-bit integer hash
    (two multiply-xorshift rounds) of (row key, token id), mapped to a uniform in (0, 1) and through -log. A token's
    noise depends on nothing else, so drawing it for fewer candidates changes no outcome. Every product stays
    below 2**63: no overflow on any device. The noise is always > 0."""
    ids = token_ids if token_ids.dim() == 2 else token_ids[None, :]
    x = row_keys[:, None] ^ ((ids * 0x9E3779B1) & _MASK32)
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (x >> 16) ^ x
    u = ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    # float32 rounds the top bucket's u (1 - 2**-25) to 1, whose noise would be 0: a forbidden token (probability
    # 0: masked by top-k/top-p or a grammar) would then score 0 / 0 = NaN, which argmax picks. Its true noise is
    # about 2**-25, which no other bucket reaches.
    return (-torch.log(u)).clamp_min(2.0 ** -25)


def _seed_for(seed: int, index: int) -> int:
    # SplitMix64-style mixing so nearby (seed, index) pairs give unrelated streams.
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def scaled_logits(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Each sampled row's logits divided by its temperature (greedy rows: by 1), with min-p applied."""
    temps = torch.where(b.temperature > 0, b.temperature, torch.ones_like(b.temperature))
    scaled = logits / temps[:, None]
    if b.min_p is not None:
        scaled = lp.apply_min_p(scaled, b.min_p)
    return scaled


def sample(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """logits [N, V] float32 -> sampled ids [N] int64, on the same device, with no host sync."""
    return sample_processed(apply_processors(logits, b), b)


def sample_processed(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """sample() on logits that apply_processors has already changed."""
    greedy = logits.argmax(dim=-1)
    if b.all_greedy:
        return greedy
    scaled = scaled_logits(logits, b)
    if b.needs_top_k or b.needs_top_p:
        values, token_ids = top_k_top_p_candidates(scaled, b)
    else:
        values, token_ids = scaled, torch.arange(scaled.shape[-1], device=scaled.device)
    choice = (values.softmax(dim=-1) / exponential_noise(b.row_keys, token_ids)).argmax(dim=-1)
    sampled = token_ids.gather(-1, choice[:, None])[:, 0] if token_ids.dim() == 2 else choice
    return torch.where(b.temperature > 0, sampled, greedy)
