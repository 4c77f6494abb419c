"""A quantized checkpoint the engine cannot serve stops `python -m engine_svc` with one clear line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.quant.tiny_packed import write_packed_pair

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_gptq_act_order_checkpoint_exits_with_one_clear_line(tmp_path):
    quantized, _ = write_packed_pair(tmp_path, "gptq")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"]["desc_act"] = True
    (quantized / "config.json").write_text(json.dumps(config))
    out = subprocess.run([sys.executable, "-m", "engine_svc", "--model", str(quantized), "--port", "0",
                          "--device", "cpu"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode == 1
    assert "cannot load" in out.stderr and "desc_act (act order) are not supported" in out.stderr
    assert "Traceback" not in out.stderr
