"""The scheduling benchmark runs end to end (tiny model, tiny sizes) and its figures mean what they say."""
from __future__ import annotations

import json

from benchmarks import scheduling
from tests.engine.tiny_models import write_tiny_llama


def test_scheduling_benchmark_on_a_tiny_model(tmp_path, capsys):
    model = write_tiny_llama(tmp_path / "tiny", max_position_embeddings=256)
    out = tmp_path / "sched.json"
    scheduling.main(["--model", str(model), "--device", "cpu", "--dtype", "float32", "--max-model-len", "256",
                     "--system-len", "40", "--num-requests", "4", "--num-streams", "3", "--long-len", "60",
                     "--chunk-budgets", "8", "--measure-steps", "4", "--tier-prefixes", "4", "--tier-prefix-len",
                     "32", "--tier-rounds", "2", "--kv-offload-gb", "1e-4", "--json", str(out)])
    results = json.loads(out.read_text())
    rows = {(r["mode"], r["prefix_caching"]): r for r in results["prefix-cache"]}
    # Sequential arrivals: every request after the first finds the 40-token prefix (2 full blocks of 16) cached.
    off, on = rows[("sequential", False)], rows[("sequential", True)]
    assert off["hit_rate"] == 0 and on["prompt_tokens_computed"] == off["prompt_tokens_computed"] - 3 * 32
    whole, chunked = results["chunked-prefill"]
    assert (whole["chunked"], chunked["chunked"], chunked["budget"]) == (False, True, 8)
    assert chunked["steps"] > whole["steps"]          # the 60-token prompt took several steps
    # Host tier: 4 prefixes of 2 blocks each, on a device pool that holds one request (5 blocks): without the tier
    # the second round recomputes every prefix; with it, it finds all of them in the host tier.
    off, on = results["host-kv-tier"]
    assert (off["host_tier"], on["host_tier"]) == (False, True) and off["host_hit_blocks"] == 0
    assert on["host_hit_blocks"] == 4 * 2 and on["prompt_tokens_computed"] == off["prompt_tokens_computed"] - 4 * 32
    table = capsys.readouterr().out
    assert "TTFT p50 ms" in table and "ITL p99 ms" in table and "host hits" in table
