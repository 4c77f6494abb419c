"""benchmarks.quant_matmul runs on the CPU (tiny shapes, interpreted kernels): every method timed, JSON written."""
from __future__ import annotations

import json

import engine_svc.kernels  # noqa: F401  (the Triton interpreter must be switched on before triton is imported)
from benchmarks import quant_matmul


def test_small_run_writes_every_method(tmp_path, capsys):
    out = tmp_path / "q.json"
    quant_matmul.main(["--small", "--rows", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["m"]) for r in rows] == [(s, 1) for s in quant_matmul.SMALL_SHAPES]
    for r in rows:
        assert all(r[m]["us"] > 0 and r[m]["gb_s"] > 0 for m in quant_matmul.METHODS)
    assert "int4 speed-up" in capsys.readouterr().out
