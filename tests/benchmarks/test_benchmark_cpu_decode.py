"""The CPU decode benchmarks' own logic: benchmarks.cpu_linears times every option (one layer, a quick run) and
benchmarks.single_stream's rates and ratios."""
from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import cpu_linears, single_stream


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cpu_linears_times_every_option(tmp_path, capsys):
    out = tmp_path / "linears.json"
    options = ["fp32", "int4-bf16", "int8-bf16", "gemv-q4/q8-head"]
    rows = cpu_linears.main(["--threads", "1", "--layers", "1", "--warmup", "1", "--repeats", "2", "--options",
                             *options, "--json", str(out)])
    assert [r["option"] for r in rows] == options and all(r["ms_median"] > 0 for r in rows)
    assert json.loads(out.read_text())["rows"] == rows
    mb = {r["option"]: r["weight_mb"] for r in rows}
    assert mb["fp32"] == pytest.approx(4 * mb["int8-bf16"])
    # the GEMV reads 6 bits a decoder weight (4-bit codes, a float32 scale and offset per 32) and 9 an lm_head
    # weight (int8 codes, a float32 scale per 32)
    # q4: 4-bit codes + an fp16 scale and offset per 32; q8: 8 bits + an fp16 scale per 32
    assert mb["gemv-q4/q8-head"] == pytest.approx((3538944 * 5 + 49152 * 576 * 8.5) / 8e6)
    assert "x fp32" in capsys.readouterr().out


def test_decode_rate_counts_tokens_after_the_first_message():
    assert single_stream.decode_tok_s([10.0, 10.5, 11.0], [1, 2, 3]) == pytest.approx(5.0)
    assert math.isnan(single_stream.decode_tok_s([3.0], [4]))   # one message: no span to measure


def test_ratios_against_the_first_stack_and_each_peer():
    rows = {name: single_stream.summarize(rates) for name, rates in (
        ("tandem serve --dtype float32", [10.0, 20.0, 15.0]), ("tandem serve --dtype auto", [40.0, 30.0, 50.0]),
        ("llama.cpp -t 2", [80.0, 100.0, 120.0]))}
    got = single_stream.ratios(rows)
    assert got == {"tandem serve --dtype auto / tandem serve --dtype float32": (40 / 15, 50 / 20),
                   "tandem serve --dtype float32 / llama.cpp -t 2": (15 / 100, 20 / 120),
                   "tandem serve --dtype auto / llama.cpp -t 2": (40 / 100, 50 / 120)}
