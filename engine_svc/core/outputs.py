"""What the scheduler reports per step for each API request. Plain Python: no torch."""
from __future__ import annotations

from dataclasses import dataclass

from engine_svc.core.request import FinishReason, Request, TokenLogprob


@dataclass(frozen=True)
class RequestOutput:
    request_id: str                        # the API's request id
    new_token_ids: list[int]
    finish_reason: FinishReason | None     # this output (index) finished
    num_cached_tokens: int | None = None   # on a request's first output: prompt tokens served by the prefix cache
    index: int = 0                         # which of the request's n outputs
    logprobs: list[TokenLogprob] | None = None          # one per new token, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None   # prompt positions 1.., on the first output of index 0
    cumulative_logprob: float | None = None             # on an output's finishing delta, when known
    last: bool = False                     # the request's last output: every index has finished
    error: str = ""                        # with FinishReason.FAILED or REJECTED: what went wrong

    @staticmethod
    def of(req: Request, tokens: list[int], lps: list[TokenLogprob] | None, reason: FinishReason | None,
           cached: int | None = None, prompt_lps: list[TokenLogprob] | None = None) -> RequestOutput:
        """The output of a request that is no group's member: its new tokens (and logprobs, when asked)."""
        wants = req.params.logprobs is not None and lps is not None
        return RequestOutput(req.external_id, tokens, reason, cached, logprobs=lps if wants else None,
                             prompt_logprobs=prompt_lps,
                             cumulative_logprob=req.cumulative_logprob if wants and reason is not None else None,
                             last=reason is not None)
