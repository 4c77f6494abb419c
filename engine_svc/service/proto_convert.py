"""Conversions between the engine's protobuf contract and its plain-Python request types, with validation."""
from __future__ import annotations

import math

from engine_svc.core.request import FinishReason, SamplingParams, StructuredOutput, TokenLogprob
from engine_svc.service.engine_loop import LoadSnapshot
from protos.tandem.internal.v1 import engine_pb2 as pb

FINISH_TO_PB = {
    None: pb.ENGINE_FINISH_NONE,
    FinishReason.STOP_TOKEN: pb.ENGINE_FINISH_STOP_TOKEN,
    FinishReason.LENGTH: pb.ENGINE_FINISH_LENGTH,
    FinishReason.ABORTED: pb.ENGINE_FINISH_ABORTED,
    FinishReason.FAILED: pb.ENGINE_FINISH_FAILED,
    FinishReason.REJECTED: pb.ENGINE_FINISH_REJECTED,
}

# Below this a temperature would overflow the logits it divides (1.4e-45 makes them inf): it is read as greedy.
MIN_TEMPERATURE = 1e-5
MAX_ABS_LENGTH_PENALTY = 10.0   # keeps length ** length_penalty finite for every length a context can have


def params_from_pb(p: pb.SamplingParams, vocab_size: int) -> SamplingParams:
    """Raises ValueError naming the field for values the engine cannot honour."""
    if not p.temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {p.temperature}")
    if not 0.0 < p.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p.top_p}")
    if p.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {p.max_tokens}")
    for name, ids in (("stop_token_ids", p.stop_token_ids), ("logit_bias", p.logit_bias.keys()),
                      ("allowed_token_ids", p.allowed_token_ids)):
        bad = sorted(t for t in ids if t >= vocab_size)
        if bad:
            raise ValueError(f"{name}: token ids {bad} are outside the vocabulary of {vocab_size}")
    if not 0.0 <= p.min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {p.min_p}")
    if not p.repetition_penalty >= 0.0:
        raise ValueError(f"repetition_penalty must be > 0, got {p.repetition_penalty}")
    for name in ("logprobs", "prompt_logprobs"):
        if p.HasField(name) and getattr(p, name) > MAX_LOGPROBS:
            raise ValueError(f"{name} must be <= {MAX_LOGPROBS}, got {getattr(p, name)}")
    n = p.n or 1
    best_of = p.best_of or n
    if best_of < n:
        raise ValueError(f"best_of ({best_of}) must be >= n ({n})")
    if p.use_beam_search and p.temperature != 0.0:
        raise ValueError(f"use_beam_search needs temperature 0 (beam search is deterministic), got {p.temperature}")
    if not (math.isfinite(p.length_penalty) and abs(p.length_penalty) <= MAX_ABS_LENGTH_PENALTY):
        raise ValueError(f"length_penalty must be in [-{MAX_ABS_LENGTH_PENALTY:g}, {MAX_ABS_LENGTH_PENALTY:g}], "
                         f"got {p.length_penalty}")
    temperature = 0.0 if p.temperature < MIN_TEMPERATURE else p.temperature
    structured = structured_output_from_pb(p.structured_output) if p.HasField("structured_output") else None
    return SamplingParams(
        temperature=temperature, top_p=p.top_p, top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None, max_tokens=p.max_tokens,
        stop_token_ids=frozenset(p.stop_token_ids), ignore_eos=p.ignore_eos, min_p=p.min_p,
        repetition_penalty=p.repetition_penalty or 1.0, presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty, logit_bias=tuple(sorted(p.logit_bias.items())),
        allowed_token_ids=frozenset(p.allowed_token_ids) if p.allowed_token_ids else None,
        min_tokens=p.min_tokens, n=n, best_of=best_of, use_beam_search=p.use_beam_search,
        length_penalty=p.length_penalty if p.use_beam_search else 1.0,
        logprobs=p.logprobs if p.HasField("logprobs") else None,
        prompt_logprobs=p.prompt_logprobs if p.HasField("prompt_logprobs") else None,
        structured_output=structured)


def structured_output_from_pb(so: pb.StructuredOutput) -> StructuredOutput:
    """The spec as text; whether it compiles is found out off the loop's thread (engine_svc.structured)."""
    kind = so.WhichOneof("kind")
    if kind is None:
        raise ValueError("structured_output: set one of json_schema, json_object, regex, choice, grammar")
    if kind == "json_object":
        if not so.json_object:
            raise ValueError("structured_output.json_object: must be true when set")
        return StructuredOutput(kind)
    if kind == "choice":
        if not so.choice.choices or not all(so.choice.choices):
            raise ValueError("structured_output.choice: needs at least one choice, none of them empty")
        return StructuredOutput(kind, choices=tuple(so.choice.choices))
    spec = getattr(so, kind)
    if not spec:
        raise ValueError(f"structured_output.{kind}: must not be empty")
    return StructuredOutput(kind, spec)


MAX_LOGPROBS = 20


def logprob_to_pb(lp: TokenLogprob) -> pb.TokenLogprobs:
    return pb.TokenLogprobs(token_id=lp.token_id, logprob=lp.logprob, top_token_ids=[t for t, _ in lp.top],
                            top_logprobs=[v for _, v in lp.top])


def check_prompt(ids, vocab_size: int) -> list[int]:
    prompt = list(ids)
    if not prompt:
        raise ValueError("prompt_token_ids is empty")
    top = max(prompt)
    if top >= vocab_size:
        raise ValueError(f"prompt token id {top} is outside the vocabulary of {vocab_size}")
    return prompt


MAX_CACHE_SALT_CHARS = 256


def check_cache_salt(salt: str) -> None:
    if len(salt) > MAX_CACHE_SALT_CHARS:
        raise ValueError(f"cache_salt is longer than {MAX_CACHE_SALT_CHARS} characters")


def load_to_pb(s: LoadSnapshot) -> pb.EngineLoad:
    return pb.EngineLoad(
        num_running=s.num_running, num_waiting=s.num_waiting, kv_blocks_total=s.kv_blocks_total,
        kv_blocks_used=s.kv_blocks_used, kv_blocks_free=s.kv_blocks_free, kv_blocks_cached=s.kv_blocks_cached,
        steps=s.steps, prefix_cache_queries=s.prefix_cache_queries, prefix_cache_hits=s.prefix_cache_hits,
        num_preemptions=s.num_preemptions, kv_integrity_checks=s.kv_integrity_checks,
        kv_integrity_failures=s.kv_integrity_failures, host_kv_blocks_total=s.host_kv_blocks_total,
        host_kv_blocks_used=s.host_kv_blocks_used, host_kv_hits=s.host_kv_hits,
        host_kv_bytes_offloaded=s.host_kv_bytes_offloaded, host_kv_bytes_loaded=s.host_kv_bytes_loaded,
        **spec_decode_fields(s.spec_decode))


def spec_decode_fields(sd) -> dict:
    """EngineLoad's spec_decode_* fields from a SpecDecodeStats."""
    return dict(spec_decode_num_drafts=sd.num_drafts, spec_decode_num_draft_tokens=sd.num_draft_tokens,
                spec_decode_num_accepted_tokens=sd.num_accepted_tokens,
                spec_decode_num_accepted_tokens_per_pos=sd.accepted_per_pos,
                spec_decode_draft_seconds=sd.draft_time_s, spec_decode_step_seconds=sd.step_time_s,
                spec_decode_acceptance_rate=sd.acceptance_rate,
                spec_decode_mean_accepted_length=sd.mean_accepted_length,
                spec_decode_draft_time_share=sd.draft_time_share,
                spec_decode_num_proposal_errors=sd.num_proposal_errors)
