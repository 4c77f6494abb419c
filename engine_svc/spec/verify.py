"""The sampling of a step with verify rows (requests whose last token is followed by proposals): every row's
logits are expanded to one row per position, processed and sampled as the sampler does, and the verify rows go
through the rejection sampler. Rows without proposals sample exactly as in a step without any."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_svc.core.request import TokenLogprob
from engine_svc.sampling.logprobs import token_logprobs
from engine_svc.sampling.sampler import SamplingBatch, apply_processors, sample_processed, to_device
from engine_svc.spec.rejection_sampler import pad_rows, rejection_sample, target_probs


@dataclass
class VerifiedStep:
    sampled: torch.Tensor                      # [rows] the first new token of each sampling row
    runs: dict[str, tuple[list[int], list[TokenLogprob] | None]]   # verify rows: all their new tokens
    logprobs: list[TokenLogprob | None] | None   # rows without proposals, when any row asked


def sample_with_proposals(logits: torch.Tensor, sampling: list, vocab_size: int, device: torch.device,
                          eos_token_ids: frozenset[int], structured=None, draft=None) -> VerifiedStep:
    """logits: the step's logits rows (1 per row without proposals, k + 1 per verify row, in order); sampling:
    the step's sampling ScheduledRequests; structured: the engine's grammars (rows without proposals only);
    draft: the draft proposer whose distributions the verify rows were drawn from (None: n-gram point masses)."""
    params, lens, histories, requests, first_row = [], [], [], [], []
    for s in sampling:
        req, extra = s.request, list(s.spec_token_ids)
        first_row.append(len(params))
        for j in range(1 + len(extra)):
            params.append(req.params)
            lens.append(req.num_output_tokens + j)
            histories.append((req.prompt_token_ids, req.output_token_ids + extra[:j]))
            requests.append(req)
    uses_penalties = any(p.uses_penalties for p in params)
    batch = SamplingBatch.build(params, lens, vocab_size, device, histories=histories if uses_penalties else None,
                                eos_token_ids=eos_token_ids)
    if structured is not None:
        mask = structured.bitmask(requests)
        if mask is not None:
            batch.grammar = (to_device(mask[0], torch.int32, device), to_device(mask[1], torch.int32, device))
    logits = apply_processors(logits, batch)
    plain = sample_processed(logits, batch)   # what each row would sample alone: the rows without proposals

    verify = [i for i, s in enumerate(sampling) if s.spec_token_ids]
    K = max(len(sampling[i].spec_token_ids) for i in verify)
    # Each verify row's k + 1 logits rows, padded to K + 1 by repeating its last row (never read: past k).
    index = [[first_row[i] + min(j, len(sampling[i].spec_token_ids)) for j in range(K + 1)] for i in verify]
    index_t = torch.tensor(index, dtype=torch.int64, device=device)
    p = target_probs(logits, batch)[index_t]                                           # [R, K + 1, V]
    proposals = pad_rows([list(sampling[i].spec_token_ids) for i in verify], K, device)
    num_proposed = torch.tensor([len(sampling[i].spec_token_ids) for i in verify], dtype=torch.int64,
                                device=device)
    q = None if draft is None else draft.proposal_probs([sampling[i].request for i in verify], K)
    keys = None if batch.row_keys is None else batch.row_keys[index_t]
    num_accepted, final = rejection_sample(p, proposals, num_proposed, q, keys)

    accepted, finals = num_accepted.tolist(), final.tolist()
    chosen = plain.clone()
    runs_tokens: dict[int, list[int]] = {}
    for r, i in enumerate(verify):
        tokens = list(sampling[i].spec_token_ids[:accepted[r]]) + [finals[r]]
        runs_tokens[i] = tokens
        chosen[first_row[i]:first_row[i] + len(tokens)] = torch.tensor(tokens, device=device)
    first = chosen[torch.tensor(first_row, dtype=torch.int64, device=device)]

    wanted = [(s.request.params.logprobs or 0) if s.request.params.needs_logprob else None for s in sampling]
    row_lps: list[list[TokenLogprob] | None] = [None] * len(sampling)
    if any(w is not None for w in wanted):
        lp_chosen, top_ids, top_lps = (t.tolist() for t in token_logprobs(logits, chosen,
                                                                           max(w or 0 for w in wanted)))
        ids = chosen.tolist()
        for i, k in enumerate(wanted):
            if k is not None:
                rows = range(first_row[i], first_row[i] + len(runs_tokens.get(i, [0])))
                row_lps[i] = [TokenLogprob(ids[x], lp_chosen[x], tuple(zip(top_ids[x][:k], top_lps[x][:k])))
                              for x in rows]
    runs = {sampling[i].request.request_id: (tokens, row_lps[i]) for i, tokens in runs_tokens.items()}
    logprobs = [row_lps[i][0] if row_lps[i] is not None else None for i in range(len(sampling))] \
        if any(w is not None for w in wanted) else None
    return VerifiedStep(first, runs, logprobs)
