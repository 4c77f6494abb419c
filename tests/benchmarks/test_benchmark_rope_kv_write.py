"""benchmarks.rope_kv_write runs on the CPU (tiny shapes, interpreted kernels) into JSON, and the issue-16 table
shows its rows, and the shuffled int4 decode against the plain one, from results as the GPU run writes them."""
from __future__ import annotations

import json

import engine_svc.kernels  # noqa: F401  (the Triton interpreter must be switched on before triton is imported)
from benchmarks import rope_kv_write
from benchmarks.gpu import issue16_table


def test_small_run_times_fused_and_pair_for_both_caches(tmp_path, capsys):
    out = tmp_path / "r.json"
    rope_kv_write.main(["--small", "--batch", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["cache"], r["batch"]) for r in rows] == [("model dtype", 1), ("fp8", 1)]
    assert all(r["fused_us"] > 0 and r["pair_us"] > 0 for r in rows)
    assert "pair/fused" in capsys.readouterr().out


def _write(directory, step, result):
    (directory / f"{step}.json").write_text(json.dumps(result))


def test_the_table_shows_the_fused_rope_and_the_shuffled_int4_rows(tmp_path):
    steps = {name: {"status": "ok", "rc": 0} for name in ("rope_kv_write", "decode_bf16", "decode_int4",
                                                          "decode_int4_shuffled")}
    (tmp_path / "steps.json").write_text(json.dumps(steps))
    shape = dict(heads=32, kv_heads=8, head_dim=128)
    _write(tmp_path, "rope_kv_write", {"rows": [
        {"cache": "bf16", "batch": 1, **shape, "fused_us": 2.0, "pair_us": 3.0},
        {"cache": "bf16", "batch": 64, **shape, "fused_us": 4.0, "pair_us": 6.0},
        {"cache": "fp8", "batch": 1, **shape, "fused_us": 3.0, "pair_us": 2.5}]})
    for step, tok_s in (("decode_bf16", 200.0), ("decode_int4", 250.0), ("decode_int4_shuffled", 300.0)):
        _write(tmp_path, step, {"model": "llama3-8b", "dtype": "bfloat16", "weight_bytes_per_token": 1e9,
                                "decode": {"decode_tok_s_median": tok_s}})
    lines = issue16_table.table(tmp_path).splitlines()
    rope = [line for line in lines if line.startswith("| RoPE + KV write")]
    assert rope == [
        "| RoPE + KV write per layer call (32/8 heads of 128), bf16 cache | batch 1: 2.00 us fused, 3.00 us pair; "
        "batch 64: 4.00 us fused, 6.00 us pair | 1.50x, 1.50x the pair's speed | faster than the pair | yes |",
        "| RoPE + KV write per layer call (32/8 heads of 128), fp8 cache | batch 1: 3.00 us fused, 2.50 us pair | "
        "0.83x the pair's speed | faster than the pair | no |"]
    shuffled = next(line for line in lines if "shuffled layout" in line)
    assert "300.0 tok/s | 1.50x bf16; 1.20x the plain int4 layout | >= 2x bf16 | no |" in shuffled
