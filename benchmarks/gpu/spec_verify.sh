#!/usr/bin/env bash
# Speculative decoding's costs on a lent GPU: Llama-3-8B shapes verifying, a Llama-3.2-1B-shape draft, random bf16
# weights (no download, no network, no wheels: torch and triton are all it needs). Prints the verify step's cost
# against K = 0..8 at batch 1, 4, 16 and 64, the draft's cost per token, and each K's break-even acceptance rate
# (benchmarks/spec_verify.py). Run from the repository root; figures and the log go to $OUT (else bench_out/).
#
#   bash benchmarks/gpu/spec_verify.sh              # about 2 minutes on an H200, start-up included
#   bash benchmarks/gpu/spec_verify.sh --iters 50   # more arguments go to the benchmark
set -euo pipefail
out="${OUT:-bench_out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true
timeout 540 python3 -m benchmarks.spec_verify --device cuda --dtype bfloat16 --batch-sizes 1 4 16 64 --max-k 8 \
  --context-len 512 --json "$out/spec_verify.json" "$@" 2>&1 | tee "$out/spec_verify.log"
