"""The text and prompts `tandem eval` ships (benchmarks/data, see its README), and their tokenization."""
from __future__ import annotations

import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_TEXT = DATA_DIR / "alice_in_wonderland.txt"
DEFAULT_PROMPTS = DATA_DIR / "alice_prompts.jsonl"


def read_text(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path} holds no text")
    return text


def read_prompts(path: Path) -> list[str]:
    """One JSON object per line with a non-empty string "prompt"."""
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line).get("prompt")
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{path}:{n}: not a JSON object: {err}") from None
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{path}:{n}: needs a non-empty string field 'prompt'")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def text_ids(tokenizer, text: str) -> list[int]:
    """The text's ids without special tokens: windows add the BOS themselves (quality_metrics.split_windows)."""
    return tokenizer.tokenizer.encode_batch_fast([text], add_special_tokens=False)[0].ids


def window_prefix(tokenizer) -> list[int]:
    """[BOS] for a model whose tokenizer adds one to every input (Llama 2/3), else nothing (SmolLM2)."""
    return [tokenizer.bos_token_id] if tokenizer.add_bos_token and tokenizer.bos_token_id is not None else []
