"""The issue-16 GPU script (benchmarks/gpu/issue16.sh, .py) cannot run here, so: every command it would run on the
GPU parses with its benchmark's own arguments, every benchmark module answers --help, the shell wrapper lists the
steps on a machine without wheels or nvidia-smi, and the same commands at tiny sizes run on the CPU end to end
(the CUDA-only steps skipped) into one table with a row per measurement."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


from benchmarks import (compiled_decode_reference, copy_bandwidth, latency, quant_matmul, rope_kv_write,
                        sampling_overhead, throughput)
from benchmarks.gpu import issue16

ROOT = Path(__file__).resolve().parents[2]
PARSERS = {
    "benchmarks.copy_bandwidth": copy_bandwidth.parse_args,
    "benchmarks.latency": latency.parse_args,
    "benchmarks.compiled_decode_reference": compiled_decode_reference.parse_args,
    "benchmarks.throughput": throughput.parse_args,
    "benchmarks.quant_matmul": quant_matmul.parse_args,
    "benchmarks.rope_kv_write": rope_kv_write.parse_args,
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
    assert "--quantization int4 --int4-gemv-layout shuffled --json" in done.stdout
