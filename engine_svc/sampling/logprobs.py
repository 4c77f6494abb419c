"""Log-probabilities for the API: of each chosen token and of the most likely alternatives, batched on the device.

They are taken from the logits after the logits processors (penalties, bias, allowed tokens) and before
temperature, top-k and top-p: the model's distribution as the request constrained it, which is also what beam
search ranks by.
"""
from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                   num_top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, V] and chosen token_ids [N] -> (chosen logprob [N], top ids [N, num_top], top logprobs
    [N, num_top]), the top ones most likely first."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, token_ids.view(-1, 1)).view(-1)
    if num_top == 0:
        empty = logp.new_empty(logp.shape[0], 0)
        return chosen, empty.long(), empty
    top_lp, top_ids = logp.topk(num_top, dim=-1)
    return chosen, top_ids, top_lp
