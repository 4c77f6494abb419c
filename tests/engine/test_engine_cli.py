"""`python -m engine_svc` fails fast and clearly on a model it cannot load."""
from __future__ import annotations

import subprocess
import sys


def test_unloadable_model_exits_with_one_clear_line(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"architectures": ["NoSuchForCausalLM"], "vocab_size": 8, "hidden_size": 8, '
                   '"intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}')
    out = subprocess.run([sys.executable, "-m", "engine_svc", "--model", str(tmp_path), "--port", "0",
                          "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "cannot load" in out.stderr and "unsupported architecture 'NoSuchForCausalLM'" in out.stderr
    assert "LlamaForCausalLM" in out.stderr      # the message lists what is supported
    assert "Traceback" not in out.stderr
