"""Checks a public GenerateRequest before any work is done. Every error names the offending field."""
from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.config import GatewayConfig
from gateway.structured_output import InvalidStructuredOutput, StructuredOutputSpec, validate_structured_output
from protos.tandem.v1 import generation_pb2 as api

CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_ADAPTER_NAME_CHARS = 64
MAX_ABS_LENGTH_PENALTY = 10.0   # the engine's bound too: length ** length_penalty stays finite for any context   # the engine loads adapters under names of at most this many characters


class InvalidRequest(ValueError):
    """Maps to INVALID_ARGUMENT; the message names the field."""


@dataclass(frozen=True)
class ValidatedRequest:
    prompt: str | None
    chat: list[tuple[str, str]] | None
    max_tokens: int | None          # None: the server default, capped by the remaining context
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    priority: int = 0
    cache_salt: str = ""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    n: int = 1
    best_of: int = 1                # candidates; the beam width with beam search
    use_beam_search: bool = False
    length_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    echo: bool = False
    adapter: str = ""               # a LoRA adapter's name; empty: the base model (the engine checks it is loaded)
    parse_special_tokens: bool = False  # chat only: special-token text in content becomes control tokens
    structured_output: StructuredOutputSpec | None = None   # the format the output follows; None: free text


def validate(req: api.GenerateRequest, config: GatewayConfig, vocab_size: int) -> ValidatedRequest:
    which = req.WhichOneof("input")
    prompt, chat = None, None
    if which is None:
        raise InvalidRequest("input: set either prompt or chat")
    if which == "prompt":
        if not req.prompt:
            raise InvalidRequest("prompt: must not be empty")
        prompt = req.prompt
        if len(prompt) > config.max_prompt_chars:
            raise InvalidRequest(f"prompt: {len(prompt)} characters, more than the limit of {config.max_prompt_chars}")
    else:
        chat = _validate_chat(req.chat)
        chars = sum(len(content) for _, content in chat)
        if chars > config.max_prompt_chars:
            raise InvalidRequest(f"chat.messages: {chars} characters of content, more than the limit of "
                                 f"{config.max_prompt_chars}")

    p = req.params
    if p.HasField("max_tokens") and p.max_tokens < 1:
        raise InvalidRequest(f"params.max_tokens: must be >= 1, got {p.max_tokens}")
    temperature = p.temperature if p.HasField("temperature") else 1.0
    if not (math.isfinite(temperature) and temperature >= 0.0):
        raise InvalidRequest(f"params.temperature: must be a finite number >= 0, got {temperature}")
    top_p = p.top_p if p.HasField("top_p") else 1.0
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise InvalidRequest(f"params.top_p: must be in (0, 1], got {top_p}")
    top_k = p.top_k if p.HasField("top_k") else 0
    if top_k < -1:
        raise InvalidRequest(f"params.top_k: must be >= -1 (0 or -1 turn it off), got {top_k}")
    if len(p.stop) > config.max_stop_strings:
        raise InvalidRequest(f"params.stop: at most {config.max_stop_strings} stop strings, got {len(p.stop)}")
    for i, s in enumerate(p.stop):
        if not s:
            raise InvalidRequest(f"params.stop[{i}]: must not be empty")
        if len(s) > config.max_stop_string_chars:
            raise InvalidRequest(f"params.stop[{i}]: longer than {config.max_stop_string_chars} characters")
    for t in p.stop_token_ids:
        if t >= vocab_size:
            raise InvalidRequest(f"params.stop_token_ids: {t} is outside the vocabulary of {vocab_size} tokens")
    min_p = _ranged(p, "min_p", 0.0, 0.0, 1.0)
    repetition_penalty = p.repetition_penalty if p.HasField("repetition_penalty") else 1.0
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0.0):
        raise InvalidRequest(f"params.repetition_penalty: must be a finite number > 0, got {repetition_penalty}")
    presence = _ranged(p, "presence_penalty", 0.0, -2.0, 2.0)
    frequency = _ranged(p, "frequency_penalty", 0.0, -2.0, 2.0)
    if len(p.logit_bias) > config.max_logit_bias:
        raise InvalidRequest(f"params.logit_bias: at most {config.max_logit_bias} entries, got {len(p.logit_bias)}")
    for t, bias in p.logit_bias.items():
        if t >= vocab_size:
            raise InvalidRequest(f"params.logit_bias: token id {t} is outside the vocabulary of {vocab_size} tokens")
        if not (math.isfinite(bias) and -100.0 <= bias <= 100.0):
            raise InvalidRequest(f"params.logit_bias[{t}]: must be in [-100, 100], got {bias}")
    for t in p.allowed_token_ids:
        if t >= vocab_size:
            raise InvalidRequest(f"params.allowed_token_ids: {t} is outside the vocabulary of {vocab_size} tokens")
    min_tokens = p.min_tokens if p.HasField("min_tokens") else 0
    if p.HasField("max_tokens") and min_tokens > p.max_tokens:
        raise InvalidRequest(f"params.min_tokens: {min_tokens} is more than max_tokens ({p.max_tokens})")
    group = _validate_group(p, config, temperature)
    try:
        structured = validate_structured_output(p, config.max_structured_output_chars, config.max_choices)
    except InvalidStructuredOutput as e:
        raise InvalidRequest(str(e)) from None
    if group["use_beam_search"]:
        temperature = 0.0
    return ValidatedRequest(
        prompt=prompt, chat=chat,
        max_tokens=p.max_tokens if p.HasField("max_tokens") else None,
        temperature=temperature, top_p=top_p, top_k=max(top_k, 0),
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop), stop_token_ids=tuple(p.stop_token_ids),
        priority=req.priority, cache_salt=_validate_cache_salt(req.cache_salt, config),
        min_p=min_p, repetition_penalty=repetition_penalty, presence_penalty=presence, frequency_penalty=frequency,
        logit_bias=tuple(sorted(p.logit_bias.items())), allowed_token_ids=tuple(p.allowed_token_ids),
        min_tokens=min_tokens, ignore_eos=p.ignore_eos, include_stop_str_in_output=p.include_stop_str_in_output,
        skip_special_tokens=p.skip_special_tokens if p.HasField("skip_special_tokens") else True,
        spaces_between_special_tokens=(p.spaces_between_special_tokens
                                       if p.HasField("spaces_between_special_tokens") else True),
        echo=p.echo, adapter=_validate_adapter(req.adapter),
        parse_special_tokens=chat is not None and req.chat.parse_special_tokens, structured_output=structured,
        **group)


def _validate_group(p: api.GenerationParams, config: GatewayConfig, temperature: float) -> dict:
    """n, best_of, beam search and logprobs, and the combinations that make no sense."""
    n = p.n if p.HasField("n") else 1
    if not 1 <= n <= config.max_n:
        raise InvalidRequest(f"params.n: must be in [1, {config.max_n}], got {n}")
    best_of = p.best_of if p.HasField("best_of") else n
    if not n <= best_of <= config.max_n:
        raise InvalidRequest(f"params.best_of: must be in [n, {config.max_n}] (n is {n}), got {best_of}")
    for name in ("logprobs", "prompt_logprobs"):
        if p.HasField(name) and getattr(p, name) > config.max_logprobs:
            raise InvalidRequest(f"params.{name}: at most {config.max_logprobs}, got {getattr(p, name)}")
    if not p.use_beam_search:
        for name in ("beam_width", "length_penalty"):
            if p.HasField(name):
                raise InvalidRequest(f"params.{name}: only applies with use_beam_search")
    else:
        if p.HasField("temperature") and temperature != 0.0:
            raise InvalidRequest(f"params.temperature: beam search is deterministic and needs temperature 0 (or "
                                 f"unset), got {temperature}")
        if p.HasField("beam_width"):
            if p.HasField("best_of") and p.best_of != p.beam_width:
                raise InvalidRequest("params.beam_width: differs from best_of; set one of them")
            best_of = p.beam_width
            if not n <= best_of <= config.max_n:
                raise InvalidRequest(f"params.beam_width: must be in [n, {config.max_n}] (n is {n}), got {best_of}")
        for name in ("logprobs", "prompt_logprobs"):
            if p.HasField(name):
                raise InvalidRequest(f"params.{name}: not available with beam search")
        if p.HasField("seed"):
            raise InvalidRequest("params.seed: beam search does not sample")
    length_penalty = p.length_penalty if p.HasField("length_penalty") else 1.0
    if not (math.isfinite(length_penalty) and abs(length_penalty) <= MAX_ABS_LENGTH_PENALTY):
        raise InvalidRequest(f"params.length_penalty: must be in [-{MAX_ABS_LENGTH_PENALTY:g}, "
                             f"{MAX_ABS_LENGTH_PENALTY:g}], got {length_penalty}")
    return dict(n=n, best_of=best_of, use_beam_search=p.use_beam_search, length_penalty=length_penalty,
                logprobs=p.logprobs if p.HasField("logprobs") else None,
                prompt_logprobs=p.prompt_logprobs if p.HasField("prompt_logprobs") else None)


def _ranged(p: api.GenerationParams, name: str, default: float, lo: float, hi: float) -> float:
    value = getattr(p, name) if p.HasField(name) else default
    if not (math.isfinite(value) and lo <= value <= hi):
        raise InvalidRequest(f"params.{name}: must be in [{lo:g}, {hi:g}], got {value}")
    return value


def _validate_cache_salt(salt: str, config: GatewayConfig) -> str:
    if len(salt) > config.max_cache_salt_chars:
        raise InvalidRequest(f"cache_salt: longer than {config.max_cache_salt_chars} characters")
    return salt


def _validate_adapter(adapter: str) -> str:
    if len(adapter) > MAX_ADAPTER_NAME_CHARS:
        raise InvalidRequest(f"adapter: longer than {MAX_ADAPTER_NAME_CHARS} characters, so never a loaded adapter")
    return adapter


def _validate_chat(chat: api.Chat) -> list[tuple[str, str]]:
    if not chat.messages:
        raise InvalidRequest("chat.messages: must not be empty")
    turns = []
    for i, m in enumerate(chat.messages):
        if m.role not in CHAT_ROLES:
            raise InvalidRequest(f"chat.messages[{i}].role: must be one of {', '.join(CHAT_ROLES)}, got {m.role!r}")
        turns.append((m.role, m.content))
    return turns


def check_prompt_length(num_tokens: int, max_model_len: int) -> None:
    if num_tokens >= max_model_len:
        raise InvalidRequest(
            f"prompt: {num_tokens} tokens do not fit the model's context of {max_model_len} tokens "
            f"(at most {max_model_len - 1} leave room to generate)")


def check_prompt_bytes(v: ValidatedRequest, max_model_len: int, max_bytes_per_token: int) -> None:
    """Refuses, before any tokenizing, a prompt too long in bytes for any encoding of it to fit the context: each
    token stands for at most max_bytes_per_token bytes (0: unknown, no check)."""
    if not max_bytes_per_token:
        return
    size = len(v.prompt.encode("utf-8")) if v.prompt is not None else sum(len(c.encode("utf-8")) for _, c in v.chat)
    if size > (max_model_len - 1) * max_bytes_per_token:
        field = "prompt" if v.prompt is not None else "chat.messages"
        raise InvalidRequest(
            f"{field}: {size} bytes need more than {max_model_len - 1} tokens (a token stands for at most "
            f"{max_bytes_per_token} bytes), so they cannot fit the model's context of {max_model_len} tokens")
