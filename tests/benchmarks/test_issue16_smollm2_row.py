"""The issue-16 table's SmolLM2 row: Tandem's decode over the same run's compiled anchor (target >= 1.3x), and what
it says when either step is missing."""
from __future__ import annotations

import json

from benchmarks.gpu.issue16_table import Results, smollm2_row

ANCHOR = "compiled static-cache decode (gpt-fast's method, benchmarks/compiled_decode_reference.py)"


def fill(tmp_path, steps: dict[str, tuple[str, float | None]]):
    """steps: name -> (status, decode tok/s or None for no JSON)."""
    statuses = {}
    for name, (status, tok_s) in steps.items():
        statuses[name] = {"status": status, "rc": 0 if status == "ok" else 1, "seconds": 1.0}
        if tok_s is not None:
            (tmp_path / f"{name}.json").write_text(json.dumps(
                {"model": "smollm2-135m", "dtype": "bfloat16", "decode": {"decode_tok_s_median": tok_s}}))
    (tmp_path / "steps.json").write_text(json.dumps(statuses))
    return Results(tmp_path)


def test_the_row_is_tandems_decode_over_the_anchors(tmp_path):
    row = smollm2_row(fill(tmp_path, {"decode_smollm2": ("ok", 1400.0), "reference_smollm2": ("ok", 1000.0)}))
    assert row == ["smollm2-135m batch-1 decode, bf16", "1,400.0 tok/s",
                   f"1.40x the anchor's 1,000.0 tok/s: {ANCHOR}", ">= 1.3x the anchor", "yes"]
    row = smollm2_row(fill(tmp_path, {"decode_smollm2": ("ok", 952.0), "reference_smollm2": ("ok", 1062.0)}))
    assert row[2].startswith("0.90x the anchor's 1,062.0 tok/s") and row[4] == "no"


def test_a_missing_step_is_named_not_measured(tmp_path):
    row = smollm2_row(fill(tmp_path, {"decode_smollm2": ("ok", 952.0), "reference_smollm2": ("failed", 1062.0)}))
    assert row[1] == "952.0 tok/s" and row[4] == ""
    assert row[2] == f"anchor not measured (failed: exit 1, see reference_smollm2.log): {ANCHOR}"
    row = smollm2_row(fill(tmp_path, {"reference_smollm2": ("ok", 1062.0)}))
    assert row[1] == "not measured (not run)" and row[4] == ""
