"""The tokenizer built for a model without one: every id of the config's vocabulary decodes, BOS and EOS sit at
the config's ids as special tokens, the words the stack benchmark builds prompts from encode to one id each, and
the directory loads through the tokenizer service's own loader."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.stack_run import text_prompts, word_pool
from benchmarks.synthetic_tokenizer import (BOS, EOS, SYNTHETIC, UNK, build_tokenizer, needs_synthetic,
                                            tokenizer_model)
from tokenizer_svc.loading import load_tokenizer


def test_every_id_is_a_token_and_the_specials_sit_at_the_configs_ids():
    tok = build_tokenizer(500, bos=7, eos=(3, 499, 900))   # 900 is outside the vocabulary: skipped
    assert tok.get_vocab_size() == 500
    specials = (tok.id_to_token(3), tok.id_to_token(499), tok.id_to_token(7), tok.id_to_token(0))
    assert specials == (EOS, f"{EOS}1", BOS, UNK)
    texts = [tok.decode([i], skip_special_tokens=False) for i in range(500)]
    assert len(set(texts)) == 500 and all(texts)
    words = [t for i, t in enumerate(texts) if i not in (0, 3, 7, 499)]
    assert words[:3] == [" aa", " ab", " ac"] and all(w[0] == " " and w[1:].isalpha() for w in words)
    assert tok.encode(" aa ab ac ad").ids == [1, 2, 4, 5]
    assert tok.encode(" zz Hello").ids == [0, 0]   # not words of this vocabulary (496 words end at " tb")


def test_the_directory_loads_and_builds_prompts_of_the_drawn_lengths(tmp_path):
    config = tmp_path / "model.json"
    config.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 64,
                                  "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "bos_token_id": 1, "eos_token_id": [2, 5]}))
    assert needs_synthetic(str(config)) and not needs_synthetic(str(tmp_path / "m.gguf"))
    with tokenizer_model(SYNTHETIC, str(config)) as directory:
        tok = load_tokenizer(directory)
        assert tok.vocab_size == 1000 and tok.eos_token_ids == (2, 5) and tok.bos_token_id == 1
        assert not tok.add_bos_token and {1, 2, 5} <= set(tok.special_token_ids)
        assert len(word_pool(tok)) == 1000 - 4
        for n, prompt in zip([1, 7, 40], text_prompts(tok, [1, 7, 40], seed=3)):
            assert len(prompt.token_ids) == n and tok.encode_text(prompt.text) == prompt.token_ids
    assert not Path(directory).exists()
    with tokenizer_model("/some/model", str(config)) as given:
        assert given == "/some/model"


@pytest.mark.parametrize("name", ["llama3-8b"])
def test_a_shipped_configs_vocabulary_is_covered(name, tmp_path):
    from benchmarks.model_arg import shipped_configs
    from benchmarks.synthetic_tokenizer import write_synthetic_tokenizer

    tok = load_tokenizer(write_synthetic_tokenizer(str(shipped_configs()[name]), tmp_path))
    assert tok.vocab_size == 128256 and tok.eos_token_ids == (128001,) and tok.bos_token_id == 128000
