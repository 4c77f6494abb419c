#!/usr/bin/env bash
# Every issue-16 GPU measurement in one call on a bare GPU machine (no network), then one table; see
# benchmarks/gpu/issue16.py. Run from the repository root:
#
#   bash benchmarks/gpu/issue16.sh                       # all steps; logs, JSON and the table under $OUT
#   bash benchmarks/gpu/issue16.sh --only decode_int4    # a rerun of some steps (the table covers them all)
#
# The wheels the machine lacks (see /work/shared/device.md: protobuf, grpcio-health-checking, grpcio-reflection,
# gguf) travel in .whl/ and are installed into a private target directory, never into the system.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/issue16-site .whl/*.whl
  export PYTHONPATH="/tmp/issue16-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1   # nothing may reach for the network: fail at once instead of hanging
OUT=${OUT:-bench_out/issue16}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/[issue16] /' || true
exec "$PY" -m benchmarks.gpu.issue16 --out "$OUT" "$@"
