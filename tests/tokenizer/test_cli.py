"""`python -m tokenizer_svc` as a process: ready line, health, clean SIGTERM; load errors; no torch."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def test_serves_until_sigterm(smollm2_gguf):
    proc = subprocess.Popen([sys.executable, "-m", "tokenizer_svc", "--model", str(smollm2_gguf), "--port", "0"],
                            cwd=REPO_ROOT, env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        match = re.fullmatch(r"[\d-]+ [\d:.]+ INFO tokenizer: listening on 127\.0\.0\.1:(\d+)\n", line)
        assert match, line
        with grpc.insecure_channel(f"127.0.0.1:{match.group(1)}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_model_is_a_clear_error(tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("not a gguf")
    result = subprocess.run([sys.executable, "-m", "tokenizer_svc", "--model", str(not_gguf)], cwd=REPO_ROOT,
                            env=_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "not a GGUF file" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "tokenizer_svc", "--model", str(tmp_path / "missing")],
                            cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "neither a directory nor a file" in result.stderr


def test_never_imports_torch():
    code = ("import sys, tokenizer_svc, tokenizer_svc.__main__; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=_env(), check=True, timeout=30)
