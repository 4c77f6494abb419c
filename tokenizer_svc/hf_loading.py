"""Loads a tokenizer from an HF model directory: tokenizer.json, tokenizer_config.json and friends."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from tokenizer_svc.chat_template import ChatTemplate
from tokenizer_svc.loaded import LoadedTokenizer
from tokenizer_svc.special_tokens import adds_bos, special_token_ids, unique_ids

# The special-token names HF exposes to chat templates (its special_tokens_map).
_TEMPLATE_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json is either a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _config_ids(value: Any) -> list[int]:
    """eos_token_id in config.json / generation_config.json: an int, a list of ints, or absent."""
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _chat_template_source(directory: Path, tok_config: dict[str, Any]) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():  # newer HF checkpoints keep it here; it takes precedence, as in transformers
        return jinja_file.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def load_hf_directory(directory: Path) -> LoadedTokenizer:
    directory = Path(directory)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok_config = _read_json(directory / "tokenizer_config.json")

    tokens = {name: _token_content(tok_config.get(name)) for name in _TEMPLATE_TOKEN_NAMES}
    ids = {name: (tokenizer.token_to_id(t) if t is not None else None) for name, t in tokens.items()}

    # tokenizer.json's post-processor alone decides what encode adds (BOS/EOS): transformers drops
    # tokenizer_config's add_bos_token / add_eos_token whenever a tokenizer.json exists.
    eos_ids = unique_ids([ids["eos_token"],
                          *_config_ids(_read_json(directory / "generation_config.json").get("eos_token_id")),
                          *_config_ids(_read_json(directory / "config.json").get("eos_token_id"))])
    source = _chat_template_source(directory, tok_config)
    template_tokens = {name: t for name, t in tokens.items() if t is not None}
    return LoadedTokenizer(
        tokenizer=tokenizer,
        eos_token_ids=eos_ids,
        bos_token_id=ids["bos_token"],
        add_bos_token=adds_bos(tokenizer, ids["bos_token"]),
        special_token_ids=special_token_ids(tokenizer),
        chat_template=ChatTemplate(source, template_tokens) if source is not None else None,
        source=str(directory),
    )
