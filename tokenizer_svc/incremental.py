"""Incremental detokenization of one request: text deltas for token ids fed one at a time.

`tokenizers.decoders.DecodeStream` does the work: it holds a token back while the text decoded so far ends in an
incomplete UTF-8 character (U+FFFD), so a delta never splits a character. It has no flush, so this class
remembers which ids it still holds; at the end of a request `flush` returns their text as a full decode shows it.

`spaces_between_special_tokens=False` (only with `skip_special_tokens=False`) follows vLLM's fast-tokenizer
detokenizer: an added token right after another added token is its content exactly, without any separator the
decoder would put in front of it (WordPiece-style decoders join tokens with a space; byte-level and Metaspace
decoders add none, so there it changes nothing). With the default True, the text is exactly what `decode` gives,
as in transformers, whose fast tokenizers ignore the option.
"""
from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# Prompt ids kept as decode context. A character spans at most 4 byte tokens, and decoders that strip a leading
# space look at one token before; a few ids settle both, however long the prompt.
CONTEXT_IDS = 6


class IncrementalDecoder:
    __slots__ = ("_tokenizer", "_stream", "_skip_special_tokens", "_last_out", "_pending", "_added", "_last_added")

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True):
        context = [int(i) for i in prompt_ids[-CONTEXT_IDS:]]
        # A context ending inside a character would make the stream re-emit or drop prompt text; without its
        # dangling bytes, the deltas are exactly the decode of the generated ids.
        while context and tokenizer.decode(context, skip_special_tokens=skip_special_tokens).endswith("\ufffd"):
            context.pop()
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        # The last id whose text has been returned: it ends on a character boundary, so it is enough context to
        # decode the held ids as they read mid-text.
        self._last_out: int | None = context[-1] if context else None
        self._pending: list[int] = []  # ids fed whose text the stream still holds
        # {added token id: content} when separators between adjacent added tokens are dropped, else None (the
        # common case: built only for requests that ask).
        self._added: dict[int, str] | None = None
        self._last_added = False
        if not (skip_special_tokens or spaces_between_special_tokens):
            self._added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
            self._last_added = bool(context) and context[-1] in self._added

    def push(self, token_id: int) -> str:
        """The new text this token completes; "" while a character is incomplete (or the token is skipped)."""
        text = self._stream.step(self._tokenizer, token_id)
        if text is None:
            self._pending.append(token_id)  # never an added token: those decode whole
            self._last_added = False
            return ""
        if self._pending:
            self._pending.clear()
        self._last_out = token_id
        if self._added is not None:
            content = self._added.get(token_id)
            if content is not None and self._last_added:
                text = content  # no separator between two added tokens
            self._last_added = content is not None
        return text

    def flush(self) -> str:
        """The text of the held ids, U+FFFD for bytes that never completed a character, as decode() shows it."""
        if not self._pending:
            return ""
        context = [] if self._last_out is None else [self._last_out]
        head = self._tokenizer.decode(context, skip_special_tokens=self._skip_special_tokens)
        full = self._tokenizer.decode(context + self._pending, skip_special_tokens=self._skip_special_tokens)
        self._last_out = self._pending[-1]
        self._pending = []
        return full[len(head):] if full.startswith(head) else full
