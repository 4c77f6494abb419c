"""Per-request state owned by the engine loop. Plain Python: no torch."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from engine_svc.core.group_policy import GroupPolicy


# Stands for a sampled token whose id is still on the device (asynchronous scheduling); never a real token id.
PLACEHOLDER = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class TokenLogprob(NamedTuple):
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]   # (token id, logprob), most likely first


class FinishReason(enum.Enum):
    STOP_TOKEN = "stop_token"   # EOS or a stop token id; it is the last output token
    LENGTH = "length"           # max_tokens or the model's context
    ABORTED = "aborted"
    FAILED = "failed"           # an error while processing this request; the engine went on serving the others
    REJECTED = "rejected"       # refused before it ran: its request is invalid (a grammar that does not compile)


STRUCTURED_OUTPUT_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must follow: kept as text (the engine compiles it off the loop's thread, and caches it by
    this value). spec is the JSON schema, regex or grammar; choices the choice list; json_object has neither."""
    kind: str
    spec: str = ""
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_OUTPUT_KINDS:
            raise ValueError(f"structured output kind must be one of {STRUCTURED_OUTPUT_KINDS}, got {self.kind!r}")
        if self.kind == "choice" and not self.choices:
            raise ValueError("a choice list needs at least one choice")

    @property
    def field(self) -> str:
        """The public API's name of the field, for error messages."""
        return f"params.structured_output.{self.kind}"


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0     # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0               # <= 0 means off
    seed: int | None = None
    max_tokens: int = 256
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    min_p: float = 0.0                          # 0 means off
    repetition_penalty: float = 1.0             # 1 means off; applies to prompt and output tokens
    presence_penalty: float = 0.0               # OpenAI semantics, output tokens only
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: frozenset[int] | None = None   # None means every token
    min_tokens: int = 0                         # EOS and stop_token_ids are impossible before this many outputs
    n: int = 1                                  # outputs returned
    best_of: int = 1                            # candidates generated (>= n); the beam width with beam search
    use_beam_search: bool = False
    length_penalty: float = 1.0                 # beam search: score = sum logprob / length ** length_penalty
    logprobs: int | None = None                 # report each output token's logprob and this many alternatives
    prompt_logprobs: int | None = None          # the same for each prompt token after the first
    structured_output: StructuredOutput | None = None   # the grammar the output follows; it ends the output on EOS

    def __post_init__(self) -> None:
        if not 1 <= self.n <= self.best_of:
            raise ValueError(f"n must be in [1, best_of]; got n={self.n}, best_of={self.best_of}")
        if self.use_beam_search and self.temperature != 0.0:
            raise ValueError("beam search is deterministic: temperature must be 0")
        if self.structured_output is not None:
            # The grammar decides where the output ends: EOS must stay possible whenever the grammar allows it.
            for name, used in (("use_beam_search", self.use_beam_search), ("ignore_eos", self.ignore_eos),
                               ("min_tokens", self.min_tokens > 0)):
                if used:
                    raise ValueError(f"structured_output cannot be combined with {name}")

    @property
    def needs_logprob(self) -> bool:
        """The chosen token's logprob is needed: asked for, or to rank best_of candidates."""
        return self.logprobs is not None or self.best_of > 1

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int                               # admission order; larger = newer (preempted first)
    priority: int = 0                          # lower is served first; ties go by arrival
    cache_salt: str = ""                       # isolates this request's prefix-cache entries (per tenant)
    adapter: str | None = None                 # LoRA adapter name; None is the base model
    token_ids: list[int] = field(init=False)   # prompt followed by outputs
    num_computed_tokens: int = 0               # tokens whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    num_cached_tokens: int | None = None       # prompt tokens found in the prefix cache when first scheduled
    block_hashes: list[bytes] = field(default_factory=list)   # chained hashes of the full blocks of token_ids
    num_indexed_blocks: int = 0                # leading blocks of block_ids already offered to the prefix cache
    external_id: str = ""                      # the API's request id (request_id is unique per member of a group)
    index: int = 0                             # which of the group's outputs or beams
    group: "GroupPolicy | None" = None         # n > 1, best_of > 1 or beam search
    cumulative_logprob: float = 0.0
    logprobs: list[TokenLogprob] = field(default_factory=list)          # kept only while outputs are held back
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)   # computed, not yet reported
    num_prompt_logprobs: int = 0               # prompt positions whose logprob has been computed (preemption
                                               # recomputes the prompt; these are not reported twice)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.external_id = self.external_id or self.request_id

    def member(self, request_id: str, params: SamplingParams, group: GroupPolicy, index: int = 0) -> Request:
        """A new member of group on this request's prompt, with its arrival, priority, cache salt and adapter."""
        return Request(request_id, self.prompt_token_ids, params, self.arrival, self.priority, self.cache_salt,
                       self.adapter, external_id=self.external_id, index=index, group=group)

    def put_token(self, position: int, token: int, lp: TokenLogprob | None) -> None:
        """The token sampled at position (over the placeholder there, or appended), and its logprob."""
        if position < self.num_tokens:
            self.token_ids[position] = token
        else:
            self.token_ids.append(token)
        if lp is not None:
            self.cumulative_logprob += lp.logprob

    def add_prompt_logprobs(self, first_position: int, entries: list[TokenLogprob]) -> None:
        """Keeps the entries for prompt positions not scored before (a preempted request scores them again)."""
        fresh = entries[max(0, self.num_prompt_logprobs + 1 - first_position):]
        self.prompt_logprobs.extend(fresh)
        self.num_prompt_logprobs += len(fresh)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def has_placeholder(self) -> bool:
        return bool(self.token_ids) and self.token_ids[-1] == PLACEHOLDER

    @property
    def sort_key(self) -> tuple[int, int]:
        # Order of service among waiting and running requests; the largest is preempted first.
        return self.priority, self.arrival

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
