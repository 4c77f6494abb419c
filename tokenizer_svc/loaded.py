"""The loaded tokenizer: what every loader produces and every RPC uses. Immutable once built."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from tokenizers import Tokenizer

from tokenizer_svc.chat_template import ChatTemplate
from tokenizer_svc.plain_content import PlainContentEncoder


class NoChatTemplateError(ValueError):
    """A chat was sent to a tokenizer that has no chat template."""


@dataclass(frozen=True)
class LoadedTokenizer:
    tokenizer: Tokenizer           # its post-processor already adds BOS/EOS as the model's config says
    eos_token_ids: tuple[int, ...]  # every id that ends generation, first the tokenizer's own EOS
    bos_token_id: int | None
    add_bos_token: bool
    special_token_ids: frozenset[int]
    chat_template: ChatTemplate | None
    source: str                    # where it came from, for logs
    plain_content: PlainContentEncoder = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Built at load, not on first use: its cost (a copy of the tokenizer) shows at startup, not in a request.
        object.__setattr__(self, "plain_content", PlainContentEncoder(self.tokenizer))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_text(self, text: str) -> list[int]:
        return self._encode(text, add_special_tokens=True)

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        if self.chat_template is None:
            raise NoChatTemplateError(f"the tokenizer from {self.source} has no chat template; send text instead")
        return self.chat_template.render(messages, add_generation_prompt=True)

    def encode_chat(self, messages: Sequence[Mapping[str, str]], parse_special_tokens: bool = False) -> list[int]:
        """The rendered chat's ids. Special-token text in message content stays plain text unless
        parse_special_tokens; only the template places control tokens (see plain_content)."""
        # HF semantics: the rendered template already holds every special token it wants, so none are added.
        # Content without special-token text takes the plain path, whose ids are those of transformers.
        if parse_special_tokens or not self.plain_content.has_special_text(m["content"] for m in messages):
            return self._encode(self.render_chat(messages), add_special_tokens=False)
        return self.plain_content.encode(messages, self.render_chat)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # Tokenizer.encode holds the GIL for its whole run (about 1.5 s per MB of text), which would stall the
        # event loop even from a worker thread; the batch call releases it, and "fast" skips unused offsets.
        return self.tokenizer.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
