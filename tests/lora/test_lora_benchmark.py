"""benchmarks.lora_throughput end to end on a tiny model (CPU): its random adapters pass the engine's validation,
every request runs on its round-robin adapter, every drawn token is produced, and the cost column is the ratio it
claims. No timing is asserted."""
from __future__ import annotations

import json

import pytest

from benchmarks import lora_throughput, throughput


def test_lora_benchmark_on_a_tiny_model(tiny_llama, tmp_path, capsys, monkeypatch):
    from engine_svc.lora.manager import LoRAManager
    used: list[set[str]] = []
    activate = LoRAManager.activate
    monkeypatch.setattr(LoRAManager, "activate",
                        lambda self, names, **kw: used.append(set(names)) or activate(self, names, **kw))
    out = tmp_path / "lora.json"
    lora_throughput.main(["--model", str(tiny_llama), "--device", "cpu", "--dtype", "float32", "--num-requests", "5",
                          "--input-len", "3", "12", "--output-len", "2", "6", "--num-loras", "0", "3",
                          "--lora-rank", "4", "--max-num-seqs", "5", "--json", str(out)])
    result = json.loads(out.read_text())
    base, lora = result["runs"]
    lengths = throughput.draw_lengths(5, (3, 12), (2, 6), seed=0)
    for run in (base, lora):
        assert run["finished"] == 5 and run["output_tokens"] == sum(n for _, n in lengths)
    assert (base["num_loras"], lora["num_loras"]) == (0, 3)
    assert base["cost_vs_base_pct"] is None
    assert lora["cost_vs_base_pct"] == pytest.approx(100 * (1 - lora["output_tok_s"] / base["output_tok_s"]))
    # the first measured step holds all five prompts: tp-0..4 round-robin over lora0..2
    assert {"lora0", "lora1", "lora2"} in used
    assert "cost vs base" in capsys.readouterr().out
