"""`tandem bench grammar` runs end to end on a tiny model (with SmolLM2's vocabulary for the grammars) and reports
every grammar's parts. No timing is asserted."""
from __future__ import annotations

import json

import pytest

from tests.engine.tiny_models import write_tiny_llama

pytest.importorskip("xgrammar")


def test_grammar_mask_on_a_tiny_model(tmp_path, smollm2_gguf, capsys):
    from benchmarks import grammar_mask

    tiny = write_tiny_llama(tmp_path / "llama", max_position_embeddings=256)
    out = tmp_path / "grammar.json"
    grammar_mask.main(["--model", str(tiny), "--vocab", str(smollm2_gguf), "--device", "cpu", "--dtype", "float32",
                       "--batch", "4", "--prompt-len", "8", "--repeats", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    assert [r["grammar"] for r in result["rows"]] == ["none", *grammar_mask.GRAMMARS]
    for r in result["rows"][1:]:
        assert r["batch"] == 4 and r["fill_ms"] > 0 and r["advance_ms"] > 0
        assert r["grammar_ms"] == pytest.approx(r["fill_ms"] + r["apply_ms"] + r["advance_ms"])
    assert "share of step" in capsys.readouterr().out
