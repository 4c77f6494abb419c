"""The issue-16 GPU script's CPU profile: every step that needs no CUDA runs end to end (one of them through a
started stack) into one table (the script's parsing and listing tests are in tests/benchmarks/)."""
from __future__ import annotations

import json

import pytest

from benchmarks.gpu import issue16
from tests.engine.tiny_models import write_tiny_llama


@pytest.mark.stack
def test_the_cpu_profile_runs_every_step_into_one_table(tmp_path, capsys):
    tiny = write_tiny_llama(tmp_path / "tiny", max_position_embeddings=256)
    out = tmp_path / "out"
    statuses = issue16.main(["--profile", "cpu", "--model", str(tiny), "--out", str(out)])
    for step in issue16.STEPS:
        expected = "skipped" if step.cuda_only else "ok"
        assert statuses[step.name]["status"] == expected, (step.name, (out / f"{step.name}.log").read_text()[-3000:]
                                                           if expected == "ok" else statuses[step.name])
    assert json.loads((out / "steps.json").read_text()) == statuses
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and "measurement" not in line]
    assert len(rows) == 18   # 15, the shuffled int4 decode, RoPE + KV write with two caches
    assert sum("not measured (skipped: needs CUDA)" in row for row in rows) == 4   # fp8 weights x 3, GPU tests
    stack = next(row for row in rows if "through the whole stack" in row)
    assert "4 finished, 0 errors" in stack and stack.endswith("| yes |")
    # A rerun of one step keeps the others' results.
    issue16.main(["--profile", "cpu", "--model", str(tiny), "--out", str(out), "--only", "copy_bandwidth"])
    assert json.loads((out / "steps.json").read_text()).keys() == statuses.keys()
