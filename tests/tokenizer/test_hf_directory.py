"""Loading a tokenizer from an HF directory, against transformers' AutoTokenizer on the same directory."""
from __future__ import annotations

import json
import shutil

import pytest

from tokenizer_svc import load_tokenizer

from tok_samples import TINY_CORPUS

SAMPLES = TINY_CORPUS[:7] + [
    "unseen words: xylophone quokka 987654",
    "新的汉字组合 and 🦙🦄 new emoji",
    "<|im_start|>user\nhello<|im_end|>",
    "a<|endoftext|>b",
    "",
]


def test_ids_match_transformers(tiny_hf_dir):
    from transformers import AutoTokenizer

    ours = load_tokenizer(tiny_hf_dir)
    ref = AutoTokenizer.from_pretrained(str(tiny_hf_dir))
    for text in SAMPLES:
        ids = ours.encode_text(text)
        assert ids == ref.encode(text, add_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids) == ref.decode(ids)


def test_config_facts(tiny_hf_dir, tiny_tokenizer):
    ours = load_tokenizer(tiny_hf_dir)
    bos, im_end = tiny_tokenizer.token_to_id("<|endoftext|>"), tiny_tokenizer.token_to_id("<|im_end|>")
    assert ours.add_bos_token and ours.bos_token_id == bos
    assert ours.encode_text("hi")[0] == bos
    # tokenizer_config's eos first, then generation_config's list, without repeats.
    assert ours.eos_token_ids == (im_end, bos)
    assert ours.vocab_size == tiny_tokenizer.get_vocab_size()
    assert ours.special_token_ids == {tiny_tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>",
                                                                             "<|im_end|>")}


def test_add_bos_token_flag_is_ignored_when_tokenizer_json_exists(tiny_hf_dir_no_template):
    from transformers import AutoTokenizer

    # tokenizer_config says add_bos_token=True, but tokenizer.json has no post-processor: transformers adds nothing.
    ours = load_tokenizer(tiny_hf_dir_no_template)
    assert not ours.add_bos_token
    assert ours.encode_text("hi") == AutoTokenizer.from_pretrained(str(tiny_hf_dir_no_template)).encode("hi")
    assert ours.encode_text("hi") == ours.tokenizer.encode("hi", add_special_tokens=False).ids


def test_chat_template_jinja_file_takes_precedence(tmp_path, tiny_hf_dir):
    directory = tmp_path / "model"
    shutil.copytree(tiny_hf_dir, directory)
    (directory / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert load_tokenizer(directory).render_chat([{"role": "user", "content": "x"}]) == "[x]"


def test_named_chat_templates_use_default(tmp_path, tiny_hf_dir):
    directory = tmp_path / "model"
    shutil.copytree(tiny_hf_dir, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "PLAIN"}]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(directory).render_chat([{"role": "user", "content": "x"}]) == "PLAIN"


def test_eos_from_config_json(tmp_path, tiny_hf_dir_no_template):
    directory = tmp_path / "model"
    shutil.copytree(tiny_hf_dir_no_template, directory)
    (directory / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert load_tokenizer(directory).eos_token_ids[-1] == 2


def test_directory_without_tokenizer_json_is_refused(tmp_path):
    from tokenizer_svc import TokenizerServiceConfig

    with pytest.raises(ValueError, match="no tokenizer.json"):
        TokenizerServiceConfig(model=tmp_path)
