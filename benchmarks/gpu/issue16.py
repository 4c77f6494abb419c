"""Every issue-16 measurement the repo can make, in one call on a bare GPU machine with no network, then one table
(benchmarks/gpu/issue16_table.py). benchmarks/gpu/issue16.sh sets up the machine and runs this.

    python -m benchmarks.gpu.issue16 --out "$OUT"                    # all steps, within --budget-s seconds
    python -m benchmarks.gpu.issue16 --out "$OUT" --only decode_int4 throughput_fp8   # a rerun of some
    python -m benchmarks.gpu.issue16 --list                          # the steps and their commands

Each step is one benchmark process with random weights at the real shapes (llama3-8b, smollm2-135m), a timeout
of its own and its output in OUT/<step>.log, its JSON in OUT/<step>.json; a step that fails or times out is
marked so and the next one runs. On a timeout the step gets SIGINT first, so a stack it started stops cleanly,
then SIGKILL. Steps run most important first, and none starts once the budget is spent: the budget leaves the
device time to rerun what failed. --profile cpu runs the same commands at tiny sizes on the CPU (with --model, a
tiny model), the check that every command still works; the fp8-weight steps and the GPU tests need CUDA and are
skipped there.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.gpu import issue16_table

STOP_GRACE_S = 40          # after SIGINT, a step's own cleanup (a stack's drain and stop) before SIGKILL
MIN_STEP_S = 20            # no step starts with less budget left than this


@dataclass(frozen=True)
class Step:
    name: str
    module: str                # python -m MODULE
    args: tuple[str, ...]      # str.format fields: the profile's sizes, and out
    timeout_s: int
    cuda_only: bool = False


def _decode(name: str, model: str, *extra: str, cuda_only: bool = False) -> Step:
    return Step(name, "benchmarks.latency",
                ("--model", model, "--device", "{device}", "{engine}", "--prompt-len", "{prompt}",
                 "--output-len", "{output}", "--ttft-prompt-lens", "--repeats", "{repeats}", *extra),
                150, cuda_only)


def _throughput(name: str, *extra: str, cuda_only: bool = False) -> Step:
    return Step(name, "benchmarks.throughput",
                ("--model", "{model}", "--device", "{device}", "{engine}", "--num-requests", "{requests}",
                 "--input-len", "{in_len}", "{in_len}", "--output-len", "{out_len}", "{out_len}",
                 "--max-num-seqs", "{max_seqs}", *extra), 240, cuda_only)


STEPS = (
    Step("copy_bandwidth", "benchmarks.copy_bandwidth", ("--device", "{device}", "--gib", "{copy_gib}"), 60),
    _decode("decode_bf16", "{model}"),
    _decode("decode_int8", "{model}", "--quantization", "int8"),
    _decode("decode_int4", "{model}", "--quantization", "int4"),
    # The same int4 weights, their GEMV over the layout pre-shuffled at load (engine_svc.quant.int4_gemv_layout).
    _decode("decode_int4_shuffled", "{model}", "--quantization", "int4", "--int4-gemv-layout", "shuffled"),
    _decode("decode_fp8", "{model}", "--quantization", "fp8", cuda_only=True),
    # The kernel-level comparisons (plain vs shuffled int4 GEMV, fused vs unfused RoPE + KV write): short, so they
    # come before the long throughput runs and land in the first call.
    Step("quant_matmul", "benchmarks.quant_matmul", ("{quant_sizes}",), 150),
    Step("rope_kv_write", "benchmarks.rope_kv_write", ("{rope_sizes}",), 90),
    # The bf16 run goes through the whole stack too (offline: a tokenizer built for the config), on the same ids.
    _throughput("throughput_bf16", "--mode", "both", "--stack-log", "{out}/throughput_bf16_stack.log"),
    _throughput("throughput_fp8", "--quantization", "fp8", cuda_only=True),
    _throughput("throughput_bf16_fp8kv", "--kv-cache-dtype", "fp8"),
    _throughput("throughput_fp8_fp8kv", "--quantization", "fp8", "--kv-cache-dtype", "fp8", cuda_only=True),
    Step("sampling", "benchmarks.sampling_overhead",
         ("--model", "{model}", "--device", "{device}", "{engine}", "--batch", "{batch}", "--prompt-len",
          "{prompt}", "--repeats", "{sampling_repeats}"), 150),
    _decode("decode_smollm2", "{small_model}"),
    # Its anchor: the same shapes and lengths decoded by gpt-fast's method, in the same run (no gpt-fast here).
    Step("reference_smollm2", "benchmarks.compiled_decode_reference",
         ("--model", "{small_model}", "--device", "{device}", "--prompt-len", "{prompt}", "--output-len", "{output}",
          "--repeats", "{repeats}"), 150),
    Step("gpu_tests", "pytest", ("-q", "-p", "no:cacheprovider", "tests/kernels/test_gpu.py",
                                 "tests/kernels/test_gpu_fp8.py", "tests/kernels/test_gpu_quant.py",
                                 "tests/kernels/test_rope_kv_write.py", "tests/kernels/test_int4_gemv_shuffled.py"),
         240, cuda_only=True),
)

# These fields expand to several arguments (or none); every other field to one.
MULTI_FIELDS = ("{engine}", "{quant_sizes}", "{rope_sizes}")
PROFILES = {
    "gpu": dict(model="llama3-8b", small_model="smollm2-135m", device="cuda", engine=(), prompt=128, output=128,
                repeats=3, requests=1024, in_len=128, out_len=128, max_seqs=512, batch=64, sampling_repeats=20,
                copy_gib=4, quant_sizes=(), rope_sizes=("--batch", "1", "64")),
    "cpu": dict(model=None, small_model=None, device="cpu", engine=("--dtype", "float32", "--max-model-len", "64",
                                                                    "--num-kv-blocks", "64"),
                prompt=8, output=3, repeats=1, requests=4, in_len=6, out_len=3, max_seqs=4, batch=4,
                sampling_repeats=1, copy_gib=0.01, quant_sizes=("--small", "--rows", "1"),
                rope_sizes=("--small", "--batch", "1")),
}


def command(step: Step, sizes: dict, out: Path) -> list[str]:
    """The step's command line for these sizes, writing its JSON under out."""
    args: list[str] = []
    for a in step.args:
        if a in MULTI_FIELDS:
            args += list(sizes[a[1:-1]])
        else:
            args.append(a.format(out=out, **sizes))
    if step.module == "pytest":
        return [sys.executable, "-m", "pytest", *args]
    return [sys.executable, "-m", step.module, *args, "--json", str(out / f"{step.name}.json")]


def run_step(cmd: list[str], log: Path, timeout_s: float) -> tuple[str, int | None]:
    """(status, exit code): ok, failed, or timeout (SIGINT, then SIGKILL of its process group)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            rc = proc.wait(timeout_s)
            return ("ok" if rc == 0 else "failed"), rc
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)   # the group this step started, nothing else
                proc.wait()
            return "timeout", proc.returncode


def run(steps: list[Step], sizes: dict, out: Path, budget_s: float, cuda: bool) -> dict[str, dict]:
    out.mkdir(parents=True, exist_ok=True)
    status_file = out / "steps.json"
    statuses = json.loads(status_file.read_text()) if status_file.exists() else {}   # a rerun keeps the others
    deadline = time.monotonic() + budget_s
    for step in steps:
        left = deadline - time.monotonic()
        if step.cuda_only and not cuda:
            statuses[step.name] = {"status": "skipped", "why": "needs CUDA"}
        elif left < MIN_STEP_S:
            statuses[step.name] = {"status": "skipped", "why": f"budget spent ({budget_s:g} s)"}
        else:
            cmd = command(step, sizes, out)
            print(f"[issue16] {step.name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            status, rc = run_step(cmd, out / f"{step.name}.log", min(step.timeout_s, left))
            statuses[step.name] = {"status": status, "rc": rc, "seconds": round(time.monotonic() - t0, 1)}
            print(f"[issue16] {step.name}: {status} after {statuses[step.name]['seconds']} s", file=sys.stderr,
                  flush=True)
        status_file.write_text(json.dumps(statuses, indent=2))
    return statuses


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.issue16", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench_out/issue16"),
                   help="logs, JSON and steps.json go here (default: $OUT, else bench_out/issue16)")
    p.add_argument("--only", nargs="+", choices=[s.name for s in STEPS], help="run these steps (a rerun)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="no step starts after this many seconds, and none runs past them (default %(default)g: one "
                        "device call of at most 600 s, and time left in a 15-minute lease to rerun what failed)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="gpu")
    p.add_argument("--model", help="--profile cpu: the tiny model (HF directory or config .json) every step uses")
    p.add_argument("--list", action="store_true", help="print the steps' commands and exit")
    args = p.parse_args(argv)
    if args.profile == "cpu" and not args.model:
        p.error("--profile cpu needs --model (a tiny model)")
    return args


def profile_sizes(args: argparse.Namespace) -> dict:
    sizes = dict(PROFILES[args.profile])
    if args.model:
        sizes["model"] = sizes["small_model"] = str(Path(args.model).absolute())
    return sizes


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    sizes = profile_sizes(args)
    steps = [s for s in STEPS if args.only is None or s.name in args.only]
    if args.list:
        for s in steps:
            print(f"{s.name:<22} {' '.join(command(s, sizes, args.out)[1:])}")
        return {}
    import torch
    cuda = args.profile == "gpu" and torch.cuda.is_available()
    if args.profile == "gpu" and not cuda:
        sys.exit("error: --profile gpu needs a CUDA device (--profile cpu runs the tiny check)")
    statuses = run(steps, sizes, args.out, args.budget_s, cuda)
    issue16_table.main([str(args.out)])
    return statuses


if __name__ == "__main__":
    main()
