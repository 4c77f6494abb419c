"""The speculative-decoding cost benchmark (benchmarks/spec_verify.py) runs on the CPU at tiny shapes, its table has
its columns, and its break-even rates and speed-ups are the formula's, from the costs it measured. No timing is
asserted."""
from __future__ import annotations

import json

import pytest

from benchmarks import spec_verify


def tiny_config(path, layers: int):
    path.write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2}))
    return path


def test_break_even_and_speed_up_arithmetic():
    # T0 = 10 ms, T(4) = 12 ms, D = 1 ms: 4 proposals cost 16 ms, so they pay once 1 + 4a > 1.6, a > 0.15.
    assert spec_verify.break_even_rate(12.0, 4, 1.0, 10.0) == pytest.approx(0.15)
    assert spec_verify.speed_up(0.15, 4, 12.0, 1.0, 10.0) == pytest.approx(1.0)
    assert spec_verify.speed_up(1.0, 4, 12.0, 1.0, 10.0) == pytest.approx(5 * 10 / 16)
    assert spec_verify.break_even_rate(12.0, 4, 0.0, 10.0) == pytest.approx(0.05)   # n-gram: no proposing cost
    assert [spec_verify.rate_cell(r) for r in (-0.2, 0.0, 0.5, 1.2)] == ["any", "any", "0.500", "never"]


def test_the_cpu_path_at_tiny_shapes(tmp_path, capsys):
    """Random weights at tiny shapes, the verify graphs' padded layout run eagerly (Triton interpreted)."""
    target, draft = tiny_config(tmp_path / "target.json", 2), tiny_config(tmp_path / "draft.json", 1)
    out = tmp_path / "spec_verify.json"
    spec_verify.main(["--device", "cpu", "--dtype", "float32", "--target", str(target), "--draft", str(draft),
                      "--attention-backend", "triton", "--graphs", "on", "--batch-sizes", "1", "2", "--max-k", "2",
                      "--context-len", "12", "--warmup", "0", "--iters", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert (result["target"], result["draft"], result["graphs"]) == ("target", "draft", True)
    assert "draft model: weights" in result["memory_plan"]
    assert [r["batch"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert len(row["verify_ms"]) == 3 and all(t > 0 for t in row["verify_ms"])
        t0, d, dg = row["decode_ms"], row["draft_ms_per_token"], row["draft_graphs_ms_per_token"]
        assert t0 > 0 and d > 0 and dg > 0
        assert [e["k"] for e in row["k"]] == [1, 2]
        for e in row["k"]:
            k, t = e["k"], e["verify_ms"]
            assert t == row["verify_ms"][k] and e["verify_over_decode"] == pytest.approx(t / t0)
            for name, per_token in (("ngram", 0.0), ("draft", d), ("draft_graphs", dg)):
                a_star = e[name]["break_even_rate"]
                assert a_star == pytest.approx(((t + k * per_token) / t0 - 1) / k)
                assert e[name]["speed_up"] == pytest.approx(
                    [(1 + a * k) * t0 / (t + k * per_token) for a in result["rates"]])
                # At the break-even rate the speed-up is 1.
                assert spec_verify.speed_up(a_star, k, t, per_token, t0) == pytest.approx(1.0)
    table = capsys.readouterr().out
    for column in ("decode ms T0", "draft ms/token", "draft graphs", "verify ms", "T(K)/T0", "a* ngram",
                   "a* draft", "a* draft_graphs", "S@0.5/0.8 ngram", "break-even a* = ((T(K) + K D) / T0 - 1) / K"):
        assert column in table
    lines = [line.split() for line in table.splitlines()]
    assert sum(1 for cells in lines if len(cells) == 10 and cells[:2] in (["1", "1"], ["1", "2"], ["2", "1"],
                                                                          ["2", "2"])) == 4
