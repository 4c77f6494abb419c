"""Draft-model proposals: a smaller model of the same vocabulary runs k single-token steps per verify row.

The draft has its own KV caches, indexed by the target's block tables (the same block ids, the draft's own
tensors, as many blocks as the target's pool; the target's memory plan counts both, see
engine_svc.worker.memory_plan): the scheduler's blocks hold both models' K/V of a position in the
same slot, so preemption, prefix caching and the freeing of rejected slots need no second bookkeeping. The draft's
K/V are valid for a request's positions below min(its draft count, the target's num_computed_tokens): a rejected
proposal's slot lies at or past the target's count, and is overwritten before it is read. Each round the draft
first computes the tokens it lacks (the prompt on a request's first round or after a preemption; otherwise the
last token, and the last accepted proposal when all were accepted) in one chunk, whose last logits give the
first proposal.

Prefix-cache hits: the draft recomputes a request's cached prefix on its first round (the draft's count starts at
0), writing into shared blocks of the draft's caches the same values (same tokens, positions and model) that are
there, or that a request without speculation never wrote. Proposals only steer speed: verification keeps the
output exact whatever the draft's K/V hold.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, replace

import torch

from engine_svc.config import EngineConfig
from engine_svc.core.request import Request, SamplingParams
from engine_svc.core.scheduler import ScheduledRequest, SchedulerOutput
from engine_svc.sampling.sampler import SamplingBatch, apply_processors, exponential_noise
from engine_svc.spec.rejection_sampler import target_probs
from engine_svc.worker.memory_plan import GB

_LOG = logging.getLogger("tandem.engine.spec")

_DRAFT_SEED_SALT = 0x5DEECE66D   # a seeded request's draft draws: independent of the target's


@dataclass
class _DraftView:
    """What the draft's runner reads of a request: its tokens followed by the proposals made so far."""
    request_id: str
    token_ids: list[int]
    block_ids: list[int]
    params: SamplingParams   # without prompt_logprobs: the draft scores no prompt
    num_prompt_tokens: int = 0


def draft_proposer_for(runner, config: EngineConfig) -> "DraftProposer":
    """The draft proposer of config.draft_model over the target's runner, loaded once per runner (engines made
    by with_scheduling share it). The runner loads the draft it was started with before its memory plan; a
    draft first named later (with_scheduling) was not in the plan."""
    proposer = runner.draft_proposers.get(config.draft_model)
    if proposer is None:
        if runner.device.type == "cuda":
            _LOG.warning("draft model %s was not in the memory plan (the runner started without it): its weights "
                         "and KV cache come out of the memory the plan left free", config.draft_model)
        proposer = runner.draft_proposers[config.draft_model] = DraftProposer(runner, config)
        proposer.fit(runner.num_blocks)
    return proposer


class DraftProposer:
    def __init__(self, target, config: EngineConfig) -> None:
        """target: the target's runner, with its config and max_model_len set (its KV cache may not be sized yet:
        the draft's cache has one block until fit())."""
        from engine_svc.worker.model_runner import ModelRunner

        # Its own forward only: no host tiers (a block the target reloads is recomputed by the draft, whose count
        # restarts for a new request), no graphs (fit() re-allocates the caches), no adapters. A config .json has
        # no weights: a draft of random weights at its shapes (benchmarks).
        load_format = "dummy" if config.draft_model.endswith(".json") else "auto"
        draft_cfg = replace(target.config, model=config.draft_model, load_format=load_format,
                            speculative_method=None, draft_model=None, num_kv_blocks=1, enable_lora=False, lora_modules=(),
                            enforce_eager=True, max_model_len=target.max_model_len, kv_offload_gb=0.0,
                            cpu_offload_gb=0.0)
        self.runner = ModelRunner(draft_cfg)
        self.vocab_size = target.model_cfg.vocab_size
        if self.runner.model_cfg.vocab_size != self.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({self.runner.model_cfg.vocab_size} tokens) differs "
                             f"from the model's ({self.vocab_size}): a draft must share its tokenizer")
        self.eos_token_ids = frozenset(target.model_cfg.eos_token_ids)
        self._computed: weakref.WeakKeyDictionary[Request, tuple[int, int]] = weakref.WeakKeyDictionary()
        # Each request's [k, V] distributions of its latest proposals, until verified (proposal_probs). Kept per
        # request, not per call: the scheduler may ask row by row (after a batched call raised). Weak: what a
        # request never verifies (its step failed) goes with it.
        self._probs: weakref.WeakKeyDictionary[Request, torch.Tensor] = weakref.WeakKeyDictionary()

    def fit(self, num_blocks: int) -> None:
        """Gives the draft's KV caches the target's block count (its K/V are stored under the target's block ids)."""
        self.runner.resize_kv(num_blocks)
        _LOG.info("draft model KV cache: %d blocks (the model's), %.2f GB", num_blocks, self.runner.plan.kv_bytes / GB)

    def propose(self, rows: list[tuple[Request, int]]) -> list[list[int]]:
        with torch.inference_mode():
            return self._propose(rows)

    def _propose(self, rows: list[tuple[Request, int]]) -> list[list[int]]:
        views, scheduled = [], []
        for req, _ in rows:
            start = req.num_computed_tokens   # the verify row's first position: its last token
            count, preemptions = self._computed.get(req, (0, req.num_preemptions))
            draft_start = min(count, start) if preemptions == req.num_preemptions else 0
            view = _DraftView(req.request_id, list(req.token_ids), req.block_ids,
                              replace(req.params, prompt_logprobs=None))
            views.append(view)
            scheduled.append(ScheduledRequest(view, start + 1 - draft_start, draft_start, samples=True))
        proposals: list[list[int]] = [[] for _ in rows]
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        active = list(range(len(rows)))
        for j in range(max(k for _, k in rows)):
            logits = self.runner.forward_logits(SchedulerOutput([scheduled[i] for i in active]))
            tokens, q = self._draw(logits, [rows[i][0] for i in active], j)
            for x, (i, token) in enumerate(zip(active, tokens.tolist())):
                proposals[i].append(token)
                probs[i].append(q[x])
                views[i].token_ids.append(token)
            active = [i for i in active if len(proposals[i]) < rows[i][1]]
            for i in active:
                scheduled[i] = ScheduledRequest(views[i], 1, rows[i][0].num_computed_tokens + j + 1, samples=True)
        for (req, k), props, qs in zip(rows, proposals, probs):
            # The draft wrote K/V at the last token's position and the first k - 1 proposals'.
            self._computed[req] = (req.num_computed_tokens + k, req.num_preemptions)
            self._probs[req] = torch.stack(qs)
        return proposals

    def _draw(self, logits: torch.Tensor, requests: list[Request], j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The draft's next token for each row and the distribution it was drawn from (the request's sampling
        settings applied to the draft's logits; greedy rows: the one-hot of the argmax)."""
        params = [replace(r.params, seed=_draft_seed(r.params.seed)) for r in requests]
        lens = [r.num_output_tokens + j for r in requests]
        batch = SamplingBatch.build(params, lens, self.vocab_size, logits.device, eos_token_ids=self.eos_token_ids,
                                    histories=[(r.prompt_token_ids, r.output_token_ids) for r in requests]
                                    if any(p.uses_penalties for p in params) else None)
        q = target_probs(apply_processors(logits, batch), batch)
        if batch.row_keys is None:
            return q.argmax(dim=-1), q
        noise = exponential_noise(batch.row_keys, torch.arange(q.shape[-1], device=q.device))
        return (q / noise).argmax(dim=-1), q

    def proposal_probs(self, requests: list[Request], width: int) -> torch.Tensor:
        """[R, width, V]: the distributions the requests' proposals were drawn from (zeros past each one's)."""
        out = None
        for r, req in enumerate(requests):
            q = self._probs.pop(req)
            if out is None:
                out = q.new_zeros(len(requests), width, q.shape[-1])
            out[r, :q.shape[0]] = q
        return out


def _draft_seed(seed: int | None) -> int | None:
    return None if seed is None else (seed ^ _DRAFT_SEED_SALT) & 0x7FFFFFFFFFFFFFFF
