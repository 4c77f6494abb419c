"""`tandem bench precision` runs its modes one engine after another on a tiny model and reports what each
engine's memory plan says. No timing is asserted."""
from __future__ import annotations

import json

import pytest

from benchmarks import precision
from benchmarks.quality_modes import mode_fields
from tests.engine.tiny_models import write_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", max_position_embeddings=128)


def test_modes_side_by_side(tiny, tmp_path, capsys):
    out = tmp_path / "precision.json"
    precision.main(["--model", str(tiny), "--device", "cpu", "--modes", "fp32", "bf16", "--prompt-len", "6",
                    "--output-len", "4", "--batch", "3", "--repeats", "1", "--warmup", "0",
                    "--num-kv-blocks", "32", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["fp32", "bf16"]
    fp32, bf16 = rows
    assert (fp32["dtype_resolved"], bf16["dtype_resolved"]) == ("float32", "bfloat16")
    # Same shapes, half the bytes: exactly half the weights and half the KV bytes per token.
    assert bf16["weights_gb"] * 2 == pytest.approx(fp32["weights_gb"])
    assert bf16["kv_bytes_per_token"] * 2 == fp32["kv_bytes_per_token"]
    assert fp32["kv_tokens"] == bf16["kv_tokens"] == 32 * 16       # --num-kv-blocks fixes the cache
    assert all(r["batch1_tok_s"] > 0 and r["batch3_tok_s"] > 0 for r in rows)
    table = capsys.readouterr().out
    assert "batch-3 tok/s" in table and "KV tokens" in table


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown mode 'int3'"):
        mode_fields("int3")
