"""Data shared by the tokenizer tests (a plain module: tests/ has no packages to import conftest from)."""

CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog. 12345 67890",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "こんにちは世界 안녕하세요 세계",
    "Emoji time 🎉🎉 🚀 👍🏽 ❤️ 🇫🇷 and more 😀😀😀",
    "Ünïcödé àccents — “quotes” and ‘single’ … ellipsis",
    "    indented line\n\ttabbed line\r\nwindows newline",
] * 20

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
