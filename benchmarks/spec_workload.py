"""A repetitive workload for speculative decoding: the prompt quotes a passage (from the text `tandem eval` ships)
and asks for it back word for word, as when a model edits code or quotes its source. The answer repeats the
prompt, which is what n-gram lookup and a draft model predict well.

A model without a tokenizer (a shipped config with random weights, a directory without tokenizer.json) gets
token ids instead: a random block repeated twice. Its output does not copy anything, so acceptance there says nothing about real use."""
from __future__ import annotations

import random
from pathlib import Path

from benchmarks.quality_data import DEFAULT_TEXT, read_text

INSTRUCTION = "Repeat the following passage exactly, word for word, and nothing else:\n\n"


def quote_prompt(model_path: str, prompt_len: int, run: int, vocab: int, load_format: str) -> list[int]:
    """About prompt_len tokens: the instruction and a passage; run picks a different passage each time."""
    path = Path(model_path)
    if load_format == "dummy" or not (path.is_file() or (path / "tokenizer.json").exists()):
        rng = random.Random(run)
        block = [rng.randrange(min(100, vocab - 1), vocab) for _ in range(max(1, prompt_len // 2))]
        return block + block
    from tokenizer_svc.loading import load_tokenizer

    tok = _tokenizers.get(model_path) or _tokenizers.setdefault(model_path, load_tokenizer(model_path))
    words = read_text(DEFAULT_TEXT).split()
    start = (run * 997) % max(1, len(words) - 4 * prompt_len)
    passage_ids = tok.tokenizer.encode_batch_fast([" ".join(words[start:start + prompt_len])],
                                                  add_special_tokens=False)[0].ids[:prompt_len]
    content = INSTRUCTION + tok.decode(passage_ids)
    if tok.chat_template is not None:
        return tok.encode_chat([{"role": "user", "content": content}])
    return tok.encode_text(content)


_tokenizers: dict = {}
