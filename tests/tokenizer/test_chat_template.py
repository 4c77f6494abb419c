"""Chat templates: rendering and ids equal transformers' apply_chat_template; errors are precise."""
from __future__ import annotations

import pytest

from tokenizer_svc import ChatTemplate, ChatTemplateError, NoChatTemplateError, load_tokenizer

SYSTEM_AND_USER = [{"role": "system", "content": "You are terse."},
                   {"role": "user", "content": "Name 3 primes < 10. 你好 🎉"}]
USER_ONLY = [{"role": "user", "content": "What is 12 + 30?"}]
MULTI_TURN = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "  two spaces and\nnewline"}]


@pytest.mark.parametrize("messages", [SYSTEM_AND_USER, USER_ONLY, MULTI_TURN], ids=["system+user", "user", "multi"])
def test_smollm_chat_matches_transformers(smollm, hf_smollm, messages):
    expected_text = hf_smollm.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert smollm.render_chat(messages) == expected_text
    # Ids: the rendered text encoded without added special tokens, as apply_chat_template(tokenize=True) does.
    # (The default system prompt and this text contain no whitespace run before a digit; see test_gguf_tokenizer.)
    assert smollm.encode_chat(messages) == hf_smollm.encode(expected_text, add_special_tokens=False)


def test_user_only_chat_gets_default_system_prompt(smollm):
    text = smollm.render_chat(USER_ONLY)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\n")


def test_hf_directory_chat_matches_transformers(tiny_hf_dir):
    from transformers import AutoTokenizer

    ours = load_tokenizer(tiny_hf_dir)
    ref = AutoTokenizer.from_pretrained(str(tiny_hf_dir))
    for messages in (SYSTEM_AND_USER, USER_ONLY, MULTI_TURN):
        expected = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.render_chat(messages) == expected
        assert expected.startswith("<|endoftext|>")  # bos_token reaches the template
        # HF adds no special tokens to a rendered chat, even with add_bos_token: BOS appears once.
        assert ours.encode_chat(messages) == ref.encode(expected, add_special_tokens=False)
        assert ours.encode_chat(messages).count(ours.bos_token_id) == 1


def test_raise_exception_becomes_chat_template_error(tiny_hf_dir):
    ours = load_tokenizer(tiny_hf_dir)
    with pytest.raises(ChatTemplateError, match="unknown role: robot"):
        ours.render_chat([{"role": "robot", "content": "beep"}])


def test_no_chat_template(tiny_hf_dir_no_template):
    ours = load_tokenizer(tiny_hf_dir_no_template)
    assert ours.chat_template is None
    with pytest.raises(NoChatTemplateError, match="no chat template"):
        ours.encode_chat(USER_ONLY)


TRICKY_TEMPLATES = [
    # tojson neither HTML-escapes nor ASCII-escapes; tojson takes HF's keyword options.
    "{% for m in messages %}{{ m | tojson }}|{{ m | tojson(indent=2, sort_keys=True) }}\n{% endfor %}",
    # loop controls, trim_blocks (newline after a tag dropped), lstrip_blocks (indent before a tag dropped).
    "{% for m in messages %}\n    {% if m.role == 'assistant' %}{% continue %}{% endif %}\n"
    "  <{{ m.role }}>{{ m.content }}\n{% endfor %}\n{% if add_generation_prompt %}\n  GEN{{ eos_token }}\n{% endif %}",
    # namespace and string methods, as common templates use them.
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{{ m.content.strip() | upper }}{% endfor %}{{ ns.n }}",
]
TRICKY_MESSAGES = [{"role": "user", "content": " <b>é & ü</b> "}, {"role": "assistant", "content": "skip me"},
                   {"role": "user", "content": "中文 🎉"}]


@pytest.mark.parametrize("source", TRICKY_TEMPLATES, ids=["tojson", "whitespace", "namespace"])
def test_environment_matches_transformers(tiny_hf_dir, source):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(tiny_hf_dir))
    expected = ref.apply_chat_template(TRICKY_MESSAGES, chat_template=source, add_generation_prompt=True,
                                       tokenize=False)
    ours = ChatTemplate(source, {"eos_token": "<|im_end|>", "bos_token": "<|endoftext|>"})
    assert ours.render(TRICKY_MESSAGES) == expected


def test_sandbox_blocks_attribute_escape():
    template = ChatTemplate("{{ messages.__class__.__mro__ }}", {})
    with pytest.raises(ChatTemplateError):
        template.render(USER_ONLY)


def test_broken_template_fails_at_load():
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for m in messages %}", {})


def test_template_type_error_is_reported():
    template = ChatTemplate("{{ messages[0]['content'] + 1 }}", {})
    with pytest.raises(ChatTemplateError, match="TypeError"):
        template.render(USER_ONLY)
