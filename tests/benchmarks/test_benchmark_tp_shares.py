"""`tandem bench throughput|latency --tensor-parallel-size 2` report the share of each step spent in collectives
and in the per-step plan broadcast (benchmarks.tp_shares), with bookkeeping that adds up: every step of the run is
counted, and a step of a 2-layer Llama on the CPU makes exactly 6 collectives on the driver (the embedding's
all-reduce, two per layer, the logits all-gather). No timing is asserted."""
from __future__ import annotations

import json

from benchmarks import latency, throughput
from tests.engine.tiny_models import write_tiny_llama

CPU = ["--device", "cpu", "--dtype", "float32", "--tensor-parallel-size", "2"]


def test_throughput_and_latency_at_t2_report_collective_and_broadcast_shares(tmp_path, capsys):
    tiny = write_tiny_llama(tmp_path / "llama", max_position_embeddings=256)
    out = tmp_path / "throughput.json"
    throughput.main(["--model", str(tiny), *CPU, "--num-requests", "4", "--input-len", "3", "20", "--output-len",
                     "2", "9", "--max-num-seqs", "2", "--json", str(out)])
    (run,) = json.loads(out.read_text())["runs"]
    shares = run["tensor_parallel"]
    assert shares["tensor_parallel_size"] == 2 and shares["steps"] == run["steps"]
    assert shares["collectives_per_step"] == 6
    assert 0 < shares["collective_share"] < 1 and 0 < shares["broadcast_share"] < 1
    assert shares["collective_share"] + shares["broadcast_share"] < 1
    assert shares["step_ms"] * 1e3 > shares["broadcast_us_per_step"] > 0
    assert "tensor parallelism T=2 on the driver" in capsys.readouterr().out

    out = tmp_path / "latency.json"
    latency.main(["--model", str(tiny), *CPU, "--prompt-len", "8", "--output-len", "5", "--ttft-prompt-lens", "40",
                  "--repeats", "1", "--warmup", "0", "--max-num-batched-tokens", "16", "--json", str(out)])
    result = json.loads(out.read_text())
    decode, (prefill,) = result["decode"]["tensor_parallel"], result["ttft"]
    assert decode["steps"] == 5 and decode["collectives_per_step"] == 6
    assert prefill["tensor_parallel"]["steps"] == 3   # 40 prompt tokens in steps of 16
    table = capsys.readouterr().out
    assert "decode: tensor parallelism T=2" in table and "prefill 40: tensor parallelism T=2" in table
