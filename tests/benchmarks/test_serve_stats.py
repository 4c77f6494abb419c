"""The load generator's arithmetic: percentiles, ITLs, Poisson arrivals, dataset parsing."""
from __future__ import annotations

import statistics

import numpy as np
import pytest

from benchmarks.serve_load import arrival_times, read_dataset
from benchmarks.serve_stats import RequestRecord, percentile, summarize


def test_percentile_matches_numpy():
    values = [0.3, 5.0, 1.0, 2.5, 9.0, 0.1, 4.4]
    for p in (0, 50, 90, 99, 100):
        assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))


def test_itls_spread_a_merged_message_over_its_tokens():
    r = RequestRecord(prompt_chars=5, max_tokens=6, sent=10.0, chunk_times=[10.5, 10.7, 11.3],
                      chunk_tokens=[1, 2, 3], output_tokens=6)
    assert r.ttft == pytest.approx(0.5) and r.e2e == pytest.approx(1.3)
    assert r.itls() == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.2])
    assert sum(r.itls()) == pytest.approx(r.e2e - r.ttft)
    s = summarize([r, RequestRecord(1, 1, error="UNAVAILABLE: gone")], duration_s=2.0)
    assert (s["completed"], s["errors"], s["output_tokens"]) == (1, 1, 6)
    assert s["tpot_s"]["mean"] == pytest.approx(0.8 / 5)
    assert s["first_errors"] == ["UNAVAILABLE: gone"]


def test_poisson_arrivals_have_the_asked_rate():
    offsets = arrival_times(4000, rate=20.0, seed=3)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets[0] == 0 and all(g >= 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / 20, rel=0.05)
    assert arrival_times(5, float("inf"), 0) == [0.0] * 5


def test_dataset_lines_are_checked(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "max_tokens": 3}\n\n{"prompt": "b", "output_len": 7}\n')
    assert read_dataset(good) == [("a", 3), ("b", 7)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "max_tokens": 3}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_dataset(bad)
