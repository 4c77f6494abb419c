"""The issue-16 GPU script (benchmarks/gpu/issue16.sh, .py) cannot run here, so: every command it would run on the
GPU parses with its benchmark's own arguments, every benchmark module answers --help, the shell wrapper lists the
steps on a machine without wheels or nvidia-smi, and the same commands at tiny sizes run on the CPU end to end
(the CUDA-only steps skipped) into one table with a row per measurement."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import copy_bandwidth, latency, quant_matmul, sampling_overhead, throughput
from benchmarks.gpu import issue16
from tests.engine.tiny_models import write_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
PARSERS = {
    "benchmarks.copy_bandwidth": copy_bandwidth.parse_args,
    "benchmarks.latency": latency.parse_args,
    "benchmarks.throughput": throughput.parse_args,
    "benchmarks.quant_matmul": quant_matmul.parse_args,
    "benchmarks.sampling_overhead": lambda argv: sampling_overhead.parse_batch_args(
        argparse.ArgumentParser(), argv, 128, 20, "bench_out/sampling_overhead.json"),
}


def test_every_gpu_command_parses_with_its_benchmarks_arguments(tmp_path):
    gpu = issue16.PROFILES["gpu"]
    for step in issue16.STEPS:
        cmd = issue16.command(step, gpu, tmp_path)
        assert cmd[:2] == [sys.executable, "-m"]
        if step.module == "pytest":
            assert all((ROOT / a).is_file() for a in cmd[3:] if a.startswith("tests/"))
            continue
        args = PARSERS[step.module](cmd[3:])   # raises SystemExit on an argument the benchmark does not take
        assert args.json == tmp_path / f"{step.name}.json"
        if step.module == "benchmarks.throughput":
            assert args.num_requests == 1024 and args.max_num_seqs == 512
            assert args.tokenizer == ("synthetic" if args.mode == "both" else None)   # no network on the GPU host


def test_every_benchmark_module_answers_help():
    for module in sorted({s.module for s in issue16.STEPS} - {"pytest"} | {"benchmarks.gpu.issue16"}):
        done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0 and "usage" in done.stdout, (module, done.stderr[-2000:])


def test_the_shell_wrapper_lists_the_steps(tmp_path):
    done = subprocess.run(["bash", "benchmarks/gpu/issue16.sh", "--list"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OUT": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    listed = [line.split()[0] for line in done.stdout.splitlines()]
    assert listed == [s.name for s in issue16.STEPS]
    assert f"--json {tmp_path}/decode_int4.json" in done.stdout


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
    assert len(rows) == 15
    assert sum("not measured (skipped: needs CUDA)" in row for row in rows) == 4   # fp8 weights x 3, GPU tests
    stack = next(row for row in rows if "through the whole stack" in row)
    assert "4 finished, 0 errors" in stack and stack.endswith("| yes |")
    # A rerun of one step keeps the others' results.
    issue16.main(["--profile", "cpu", "--model", str(tiny), "--out", str(out), "--only", "copy_bandwidth"])
    assert json.loads((out / "steps.json").read_text()).keys() == statuses.keys()
