"""Chat encoding in which special-token text typed into message content stays plain text.

A chat template renders the messages to one string. Encoding that string with special tokens parsed turns a
`<|im_end|>` typed by a user into a real control token: a forged turn. Only the template may place control tokens.

How, and why this way: the content's special-token text is swapped for per-call placeholders before rendering, so
every special-token text left in the rendered string is the template's own (a template that cuts or inspects the
content is refused: its rendering must equal the real one once the placeholders are swapped back). Each of the
template's is swapped for a marker string that a copy of the tokenizer knows as an ordinary added token (with the
lstrip/rstrip/single_word/normalized flags of the special token it stands for), each placeholder is swapped back to
its original text, and the copy, with `encode_special_tokens` on (special tokens encoded as text), encodes the whole
string in one pass; marker ids then map back to the real control ids. Because it is one pass over the whole string,
split at the same points, the text between control tokens is normalized, pre-tokenized and merged exactly as the
plain encoding does it: no seams where content meets template text, and prefix-space and lstrip/rstrip rules
unchanged. Encoding template pieces and content pieces separately would change BPE merges and prefix spaces at
every boundary.

Special tokens are found by exact text, as the tokenizer matches those with normalized=False (every special token
the loaders make, and what transformers writes for special tokens).
"""
from __future__ import annotations

import re
import secrets
from typing import Callable, Iterable, Mapping, Sequence

from tokenizers import AddedToken, Tokenizer

from tokenizer_svc.chat_template import ChatTemplateError

# Private-use characters bracket placeholders and markers; a random nonce inside makes them unguessable, so
# no content can spell one. Markers never leave this process: their ids are mapped back before returning.
_OPEN, _CLOSE = "\ue000", "\ue001"

Messages = Sequence[Mapping[str, str]]


class PlainContentEncoder:
    def __init__(self, tokenizer: Tokenizer):
        special = sorted(((i, t) for i, t in tokenizer.get_added_tokens_decoder().items() if t.special),
                         key=lambda item: item[0])
        self._texts = [t.content for _, t in special]
        # Longest first: at one position the longest special token wins, as the tokenizer's own matcher does.
        by_length = sorted(self._texts, key=len, reverse=True)
        self._special = re.compile("|".join(map(re.escape, by_length))) if by_length else None
        self._marker_nonce = secrets.token_hex(16)
        self._plain = Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        markers = [f"{_OPEN}{self._marker_nonce}.{k}{_CLOSE}" for k in range(len(special))]
        self._plain.add_tokens([AddedToken(m, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip,
                                           normalized=t.normalized, special=False)
                                for m, (_, t) in zip(markers, special)])
        self._marker_of = dict(zip(self._texts, markers))
        self._real_id = {self._plain.token_to_id(m): i for m, (i, _) in zip(markers, special)}

    def has_special_text(self, texts: Iterable[str]) -> bool:
        return self._special is not None and any(self._special.search(t) for t in texts)

    def encode(self, messages: Messages, render: Callable[[Messages], str]) -> list[int]:
        """The chat rendered by `render` as ids, with control tokens only where the template put them."""
        if self._special is None:
            return self._encode(render(messages))
        nonce = secrets.token_hex(8)
        placeholder_of = {text: f"{_OPEN}{nonce}.{k}{_CLOSE}" for k, text in enumerate(self._texts)}
        hidden = [{**m, "content": self._special.sub(lambda s: placeholder_of[s.group()], m["content"])}
                  for m in messages]
        rendered = render(hidden)
        placeholder = re.compile(re.escape(_OPEN + nonce) + r"\.(\d+)" + re.escape(_CLOSE))
        if placeholder.sub(lambda p: self._texts[int(p.group(1))], rendered) != render(messages):
            # The template cut, measured or searched the content, so where its special-token text went is unknown.
            raise ChatTemplateError("this chat template alters message content that holds special-token text, so "
                                    "that text cannot be kept plain; remove it or set parse_special_tokens")
        if self._marker_nonce in rendered:
            raise ChatTemplateError("message content holds a reserved marker")
        # One pass: placeholders back to the content's text, the template's special-token text to markers.
        both = re.compile(f"{placeholder.pattern}|{self._special.pattern}")
        text = both.sub(lambda x: self._texts[int(x.group(1))] if x.group(1) is not None
                        else self._marker_of[x.group()], rendered)
        return self._encode(text)

    def _encode(self, text: str) -> list[int]:
        # As LoadedTokenizer._encode: the batch call releases the GIL; the rendered chat gets no added tokens.
        ids = self._plain.encode_batch_fast([text], add_special_tokens=False)[0].ids
        return [self._real_id.get(i, i) for i in ids]
