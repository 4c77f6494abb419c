"""The LoRA engine flags and their validation."""
from __future__ import annotations

import pytest

from engine_svc.config import EngineConfig, config_from_args


def test_lora_flags_parse():
    cfg = config_from_args(["--model", "m", "--enable-lora", "--max-loras", "8", "--max-lora-rank", "16",
                            "--max-cpu-loras", "32"])
    assert (cfg.enable_lora, cfg.max_loras, cfg.max_lora_rank, cfg.max_cpu_loras) == (True, 8, 16, 32)
    default = config_from_args(["--model", "m"])
    assert (default.enable_lora, default.max_loras, default.max_lora_rank) == (False, 4, 64)


@pytest.mark.parametrize("changes,message", [
    (dict(max_loras=0), "max_loras must be >= 1"),
    (dict(max_lora_rank=0), "max_lora_rank must be in"),
    (dict(max_loras=8, max_cpu_loras=4), "max_cpu_loras must be >= max_loras"),
])
def test_bad_lora_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(model="m", **changes)
